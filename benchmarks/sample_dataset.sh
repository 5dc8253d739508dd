# Sourced by the GPU scripts (gpu_check_job.sh, gpu_stability.sh), from the repository root with
# PYTHON and REPO set: `tokenize_sample DIR` tokenizes the bundled C4-format sample into
# DIR/sample_text_document and sets the array `tokenizer` to its tokenizer's flags. The tokenizer is
# GPT-2's BPE where its files are found (MEGATRON_SNM_GPT2_DIR, ../shared/data/gpt2 where the tests
# look, shared/data/gpt2 or data/gpt2 where the examples look), else a small SentencePiece model
# trained on the sample (the GPU machine has no network).
SAMPLE=data/sample/c4-train.00000-of-00001.json.gz

tokenize_sample() {
    local dir=$1 gpt2
    mkdir -p "$dir"
    tokenizer=()
    for gpt2 in ${MEGATRON_SNM_GPT2_DIR:-} "$REPO/../shared/data/gpt2" "$REPO/shared/data/gpt2" "$REPO/data/gpt2"; do
        if [[ -f "$gpt2/vocab.json" && -f "$gpt2/merges.txt" ]]; then
            tokenizer=(--tokenizer-type GPT2BPETokenizer --vocab-file "$gpt2/vocab.json" --merge-file "$gpt2/merges.txt")
            break
        fi
    done
    if ((${#tokenizer[@]} == 0)); then
        echo "no GPT-2 vocab.json/merges.txt found: a SentencePiece tokenizer trained on the sample instead"
        "$PYTHON" tools/train_tokenizer.py --input "$SAMPLE" --model-prefix "$dir/tokenizer" --vocab-size 2000 --overwrite
        tokenizer=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$dir/tokenizer.model")
    fi
    "$PYTHON" tools/preprocess_data.py --input "$SAMPLE" --output-prefix "$dir/sample" "${tokenizer[@]}" --overwrite \
        --append-eod --workers 4
}
