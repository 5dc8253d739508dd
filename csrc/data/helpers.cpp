// Index builders for the GPT and blended datasets (megatron_snm.data._helpers).
//
// These run once per training run over every document of the corpus (hundreds of millions
// for C4), so they are C++: a Python loop would take minutes to hours.
//
//   build_document_sample_index  the document ids of every epoch, shuffled (Megatron's layout),
//                                and where each sample of seq_length + 1 tokens starts (the same
//                                rows as Megatron's build_sample_idx for that document order)
//   build_shuffle_index          the order samples are served in
//   build_blending_indices       which dataset each blended sample comes from (Megatron's rule)
//
// The shuffles use our own generator (xoshiro256**), so results depend only on the seed, not on
// the numpy or compiler version.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// ---------------------------------------------------------------------------------------------
// Random numbers: splitmix64 to derive seeds, xoshiro256** for streams (both public domain,
// Vigna), Lemire's multiply-shift with rejection for unbiased integers in [0, range).

uint64_t splitmix64(uint64_t &state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// A seed for sub-stream `stream` of `seed`: different streams are independent.
uint64_t derive_seed(uint64_t seed, uint64_t stream) {
  uint64_t s = seed;
  uint64_t a = splitmix64(s);
  s = a ^ (stream * 0xD1B54A32D192ED03ULL);
  return splitmix64(s);
}

class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto &w : s_) w = splitmix64(seed);
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  // Uniform in [0, range), range >= 1, without modulo bias.
  uint64_t below(uint64_t range) {
    __uint128_t m = static_cast<__uint128_t>(next()) * range;
    uint64_t low = static_cast<uint64_t>(m);
    if (low < range) {
      const uint64_t threshold = (0 - range) % range;
      while (low < threshold) {
        m = static_cast<__uint128_t>(next()) * range;
        low = static_cast<uint64_t>(m);
      }
    }
    return static_cast<uint64_t>(m >> 64);
  }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// ---------------------------------------------------------------------------------------------
// Shuffle: scatter every item into one of B buckets chosen uniformly at random, then shuffle
// each bucket (small enough to stay in cache). A uniform bucket assignment followed by uniform
// shuffles of the buckets is a uniform permutation (Rao 1961; Sanders 1998). Both passes touch
// memory sequentially, apart from B write cursors, where a plain Fisher-Yates over 10^8 items
// spends nearly all its time in cache misses. The result depends only on the seed and n.

constexpr int64_t kBucketItems = int64_t(1) << 16;

// Shuffles the n items that fill(emit) emits in order, then hands the permutation to
// take(first, items, count) bucket by bucket, in order: items[0, count) are positions
// [first, first + count) of the result.
template <typename T, typename Fill, typename Take>
void bucket_shuffle(int64_t n, uint64_t seed, Fill fill, Take take) {
  if (n == 0) return;
  const int64_t num_buckets = std::max<int64_t>(1, n / kBucketItems);
  std::vector<T> scattered(static_cast<size_t>(n));
  std::vector<int64_t> start(static_cast<size_t>(num_buckets) + 1, 0);
  {
    // Count, then scatter, drawing the same bucket sequence twice (cheaper than storing it).
    Rng rng(derive_seed(seed, 0));
    for (int64_t i = 0; i < n; ++i) ++start[rng.below(num_buckets) + 1];
    for (int64_t b = 0; b < num_buckets; ++b) start[b + 1] += start[b];
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    Rng again(derive_seed(seed, 0));
    fill([&](const T &item) { scattered[cursor[again.below(num_buckets)]++] = item; });
  }
  std::vector<T> bucket;
  for (int64_t b = 0; b < num_buckets; ++b) {
    // Inside-out Fisher-Yates: bucket becomes a uniform permutation of this bucket's items.
    const T *in = scattered.data() + start[b];
    const int64_t count = start[b + 1] - start[b];
    bucket.resize(static_cast<size_t>(count));
    Rng rng(derive_seed(seed, static_cast<uint64_t>(b) + 1));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i) + 1));
      bucket[i] = bucket[j];
      bucket[j] = in[i];
    }
    take(start[b], bucket.data(), count);
  }
}

void check(bool ok, const std::string &message) {
  if (!ok) throw py::value_error(message);
}

// ---------------------------------------------------------------------------------------------
// Sample index (Megatron's build_sample_idx with drop_last_partial_sequence=true and
// add_extra_token_to_sequence=1), fed one document length at a time in document-index order:
// row i is (position in the document index, token offset in that document) where sample i
// starts; it ends, its extra token included, at row i + 1, which is where sample i + 1 starts.

template <typename Out>
class SampleIndex {
 public:
  SampleIndex(Out *rows, int64_t num_samples, int64_t seq_length)
      : rows_(rows), num_samples_(num_samples), seq_length_(seq_length), remaining_(seq_length + 1) {
    rows_[0] = 0;
    rows_[1] = 0;
  }

  void add_document(int64_t position, int64_t length) {
    int64_t offset = 0;
    while (next_ <= num_samples_) {
      const int64_t left = length - offset;
      remaining_ -= left;
      if (remaining_ > 0) return;  // the sample continues in the next document
      // The sample ends in this document; the next one starts on its last token.
      offset += remaining_ + left - 1;
      rows_[2 * next_] = static_cast<Out>(position);
      rows_[2 * next_ + 1] = static_cast<Out>(offset);
      ++next_;
      remaining_ = seq_length_ + 1;
    }
  }

  bool complete() const { return next_ > num_samples_; }

 private:
  Out *rows_;
  int64_t num_samples_, seq_length_, remaining_;
  int64_t next_ = 1;
};

// Samples that the concatenation of num_epochs * tokens_per_epoch tokens yields.
int64_t num_samples_of(int64_t num_epochs, int64_t tokens_per_epoch, int64_t seq_length) {
  // Each sample takes seq_length new tokens; its extra (+1) token is the next sample's first.
  return (num_epochs * tokens_per_epoch - 1) / seq_length;
}

// ---------------------------------------------------------------------------------------------
// Document index + sample index. The document index is documents [begin, end) repeated
// num_epochs times and shuffled; with separate_final_epoch the last epoch is shuffled on its own
// (Megatron does this when little of the last epoch is used, so that those samples do not
// repeat documents of the earlier epochs). Each document travels through the shuffle with its
// length, so the sample index is built from lengths already in order (looking them up in
// `sizes` by shuffled id would be one cache miss per document).

template <typename Doc>
struct DocAndLength {
  Doc doc;
  int32_t length;
};

template <typename Doc, typename Out>
py::tuple build_document_sample_index_t(const int32_t *sizes, int64_t begin, int64_t end, int64_t num_epochs,
                                        bool separate_final_epoch, int64_t seq_length, int64_t num_samples,
                                        uint64_t seed) {
  const int64_t num_docs = end - begin;
  const int64_t total = num_docs * num_epochs;
  py::array_t<Doc> document_index({static_cast<py::ssize_t>(total)});
  py::array_t<Out> sample_index({static_cast<py::ssize_t>(num_samples + 1), py::ssize_t(2)});
  Doc *docs = document_index.mutable_data();
  bool complete;
  {
    py::gil_scoped_release release;
    SampleIndex<Out> samples(sample_index.mutable_data(), num_samples, seq_length);
    using Item = DocAndLength<Doc>;
    // One shuffle over epochs [0, epochs), written from position `first` on.
    auto shuffle_epochs = [&](int64_t epochs, int64_t first, uint64_t stream) {
      auto fill = [&](auto emit) {
        for (int64_t e = 0; e < epochs; ++e)
          for (int64_t d = begin; d < end; ++d) emit(Item{static_cast<Doc>(d), sizes[d]});
      };
      auto take = [&](int64_t at, const Item *items, int64_t count) {
        for (int64_t i = 0; i < count; ++i) {
          docs[first + at + i] = items[i].doc;
          samples.add_document(first + at + i, items[i].length);
        }
      };
      bucket_shuffle<Item>(epochs * num_docs, derive_seed(seed, stream), fill, take);
    };
    if (separate_final_epoch && num_epochs > 1) {
      shuffle_epochs(num_epochs - 1, 0, 1);
      shuffle_epochs(1, total - num_docs, 2);
    } else {
      shuffle_epochs(num_epochs, 0, 1);
    }
    complete = samples.complete();
  }
  check(complete, "build_document_sample_index: the documents hold fewer tokens than the samples need");
  return py::make_tuple(document_index, sample_index);
}

py::tuple build_document_sample_index(py::array_t<int32_t, py::array::c_style> sizes, int64_t begin, int64_t end,
                                      int64_t num_epochs, bool separate_final_epoch, int64_t seq_length,
                                      uint64_t seed) {
  check(sizes.ndim() == 1, "build_document_sample_index: sizes must be 1-D");
  check(0 <= begin && begin < end && end <= sizes.shape(0),
        "build_document_sample_index: need 0 <= begin < end <= len(sizes)");
  check(num_epochs >= 1, "build_document_sample_index: num_epochs must be >= 1");
  check(seq_length >= 1, "build_document_sample_index: seq_length must be >= 1");
  const int32_t *s = sizes.data();
  int64_t tokens_per_epoch = 0, longest = 0;
  for (int64_t d = begin; d < end; ++d) {
    check(s[d] >= 0, "build_document_sample_index: negative document size");
    tokens_per_epoch += s[d];
    longest = std::max<int64_t>(longest, s[d]);
  }
  check(tokens_per_epoch >= 1, "build_document_sample_index: the documents hold no tokens");
  check(end - begin <= std::numeric_limits<int64_t>::max() / num_epochs / 16, "build_document_sample_index: too many documents");
  const int64_t num_samples = num_samples_of(num_epochs, tokens_per_epoch, seq_length);
  const int64_t total = (end - begin) * num_epochs;
  // Narrow types where the values fit, as Megatron does: these arrays are the big ones.
  const bool doc32 = end - 1 <= std::numeric_limits<int32_t>::max();
  const bool out32 = std::max(total, longest) <= std::numeric_limits<int32_t>::max();
  if (doc32 && out32)
    return build_document_sample_index_t<int32_t, int32_t>(s, begin, end, num_epochs, separate_final_epoch, seq_length,
                                                           num_samples, seed);
  if (doc32)
    return build_document_sample_index_t<int32_t, int64_t>(s, begin, end, num_epochs, separate_final_epoch, seq_length,
                                                           num_samples, seed);
  return build_document_sample_index_t<int64_t, int64_t>(s, begin, end, num_epochs, separate_final_epoch, seq_length,
                                                         num_samples, seed);
}

// ---------------------------------------------------------------------------------------------
// Shuffle index: [0, num_samples) shuffled, followed by [num_samples, total_size) shuffled on
// its own (the samples of a separated final epoch stay at the end).

template <typename T>
py::array build_shuffle_index_t(int64_t num_samples, int64_t total_size, uint64_t seed) {
  py::array_t<T> result({static_cast<py::ssize_t>(total_size)});
  T *out = result.mutable_data();
  {
    py::gil_scoped_release release;
    auto shuffle_range = [&](int64_t lo, int64_t hi, uint64_t stream) {
      auto fill = [&](auto emit) {
        for (int64_t i = lo; i < hi; ++i) emit(static_cast<T>(i));
      };
      auto take = [&](int64_t at, const T *items, int64_t count) { std::copy(items, items + count, out + lo + at); };
      bucket_shuffle<T>(hi - lo, derive_seed(seed, stream), fill, take);
    };
    shuffle_range(0, num_samples, 3);
    shuffle_range(num_samples, total_size, 4);
  }
  return result;
}

py::array build_shuffle_index(int64_t num_samples, int64_t total_size, uint64_t seed) {
  check(0 <= num_samples && num_samples <= total_size, "build_shuffle_index: need 0 <= num_samples <= total_size");
  if (total_size < static_cast<int64_t>(std::numeric_limits<uint32_t>::max()) - 1)
    return build_shuffle_index_t<uint32_t>(num_samples, total_size, seed);
  return build_shuffle_index_t<int64_t>(num_samples, total_size, seed);
}

// ---------------------------------------------------------------------------------------------
// Blending (Megatron's build_blending_indices): sample i comes from the dataset whose count is
// furthest below weight * i, ties to the lowest index; dataset_sample_index[i] is how many
// samples that dataset had served before.

py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights, int64_t size) {
  const int64_t num_datasets = weights.shape(0);
  check(weights.ndim() == 1 && num_datasets >= 1, "build_blending_indices: weights must be a non-empty 1-D array");
  check(num_datasets <= std::numeric_limits<int16_t>::max(), "build_blending_indices: at most 32767 datasets");
  check(size >= 0, "build_blending_indices: size must be >= 0");
  const double *w = weights.data();
  for (int64_t d = 0; d < num_datasets; ++d) check(w[d] >= 0, "build_blending_indices: weights must be >= 0");
  py::array_t<int16_t> dataset_index({static_cast<py::ssize_t>(size)});
  py::array_t<int64_t> dataset_sample_index({static_cast<py::ssize_t>(size)});
  int16_t *which = dataset_index.mutable_data();
  int64_t *nth = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> served(static_cast<size_t>(num_datasets), 0);
    for (int64_t i = 0; i < size; ++i) {
      const double step = std::max(static_cast<double>(i), 1.0);
      int64_t best = 0;
      double best_error = w[0] * step - static_cast<double>(served[0]);
      for (int64_t d = 1; d < num_datasets; ++d) {
        const double error = w[d] * step - static_cast<double>(served[d]);
        if (error > best_error) {
          best_error = error;
          best = d;
        }
      }
      which[i] = static_cast<int16_t>(best);
      nth[i] = served[best]++;
    }
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers, m) {
  m.doc() = "Sample-, shuffle- and blending-index builders for megatron_snm.data";
  m.def("build_document_sample_index", &build_document_sample_index, py::arg("sizes"), py::arg("begin"),
        py::arg("end"), py::arg("num_epochs"), py::arg("separate_final_epoch"), py::arg("seq_length"), py::arg("seed"),
        "(document_index, sample_index): documents begin..end-1 over num_epochs shuffled (int32, or int64 for\n"
        "large ids), and the [num_samples + 1, 2] (position, offset) start of each sample of seq_length + 1\n"
        "tokens (int32, or int64 when large), as Megatron's build_sample_idx.");
  m.def("build_shuffle_index", &build_shuffle_index, py::arg("num_samples"), py::arg("total_size"), py::arg("seed"),
        "[0, num_samples) shuffled, then [num_samples, total_size) shuffled (uint32, or int64 when large).");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index int16[size], dataset_sample_index int64[size]) by Megatron's greedy rule.");
}
