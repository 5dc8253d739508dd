"""The one home of checkpoints (it imports nothing from training/; the trainer calls it).

A training run's checkpoints: save_load.py (save through DeepSpeed's engine, sync or --async-save
with background_writer.py; load, resharded by reshard.py when the layout differs; the run metadata
and its compatibility check; retention), save_dir.py (one run owns --save), format.py (names,
`latest`, weights-only loading, `publish`), manifest.py (checksums), errors.py.

Checkpoints as layout-free weights: read any saved layout, write any layout.

    from megatron_snm.checkpoint.read import read_checkpoint        # any TP / PP / ZeRO 0-3 save
    ckpt = read_checkpoint(save_dir)            # .weights (full tensors, GPTModel's TP=1 names),
                                                # .metadata (megatron_snm.json), .gpt_config()
    model = ckpt.model                          # its description (model/describe.py)
    from megatron_snm.checkpoint.layout import split_for_tensor_parallel, resize_vocabulary
    local = split_for_tensor_parallel(model, resize_vocabulary(model, ckpt.weights, rows), tp_size, tp_rank)
    from megatron_snm.checkpoint.write import write_checkpoint      # weights-only, for --load

layout.py cuts and joins by the model's description (which dimension TP splits, which DeepSpeed
pipeline layer a weight belongs to: model/describe.py), and pads the vocabulary; metadata.py gives
the description of a checkpoint's model; read.py and write.py are the two directions; tokenizer.py finds
and checks the tokenizer a run recorded.
"""
