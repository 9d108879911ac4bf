"""What `make train` runs: a 4-layer, 8-expert top-p model on the King James Bible, sized to
train in about 9 minutes on 2 CPU cores."""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.dataset = "kjv"  # kjv | pydoc | text_dir:PATH | a TFDS text dataset name
    # Trains on pydoc when kjv is not installed (`make bible` installs it); the run says so at
    # start-up and records the corpus used in workdir/config.json. '' = a missing corpus is an
    # error.
    c.fallback_dataset = "pydoc"
    c.data_dir = ""  # dataset and tokenizer cache; '' = $DYNMOE_DATA_DIR or ~/.cache/dynmoe_jax
    c.tokenizer = "sentencepiece"  # sentencepiece | bytes
    c.vocab_size = 2048
    c.seq_len = 128
    c.batch_size = 16
    c.num_train_steps = 700
    c.warmup_steps = 70
    c.learning_rate = 3e-3
    c.min_learning_rate_ratio = 0.1  # cosine decays to 10% (paper)
    c.weight_decay = 0.1
    c.adam_b1 = 0.9
    c.adam_b2 = 0.95
    c.grad_clip_norm = 1.0
    c.grad_accum_steps = 1
    c.log_every_steps = 25
    c.eval_every_steps = 175
    c.eval_batches = 16
    c.checkpoint_every_steps = 175
    c.keep_checkpoints = 3
    c.mesh_shape = ""  # '' = one device; e.g. "data=2,expert=4"
    c.nonfinite = "skip"  # skip: drop the update and count it | stop: raise, keep checkpoints
    # A Hugging Face MoE checkpoint folder to start from ('' = train this config's own model);
    # see configs/pretrained.py and the README's "Bring your own MoE".
    c.init_from = ""

    c.model = ConfigDict()
    c.model.ffn = "moe"  # moe | dense (the dense baseline)
    c.model.d_model = 256
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_ff = 1024  # width of dense feed-forward layers
    c.model.moe_every = 1
    c.model.dtype = "float32"  # float32 | bfloat16 (the router stays float32)
    # none | full | dots (keeps the outputs of matmuls without batch axes); the booleans of
    # earlier configs still work (False = none, True = full), hence a field of any type.
    c.model.remat = config_dict.FieldReference("none", field_type=object)
    # Per layer: scanning compiled slower (24.8 s vs 18.2 s) and stepped no faster (fwd+bwd
    # 4072 vs 3977 ms, medians of 10 alternating calls on 2 loaded CPU cores) at 4 layers
    # (experiments/bench_compile.py --config default).
    c.model.scan_layers = False

    c.moe = ConfigDict()
    c.moe.router = "top_p"  # top_p | top_k
    c.moe.threshold = 0.4
    c.moe.top_k = 2
    c.moe.max_k = config_dict.placeholder(int)  # None = no cap (the paper)
    c.moe.num_experts = 8
    c.moe.d_ff = 512  # width of each expert
    c.moe.capacity_factor = config_dict.FieldReference(1.25, field_type=float)  # None: no drops
    c.moe.expected_k = 2.0
    c.moe.group_size = config_dict.placeholder(int)  # None = one group per sequence
    # grouped (one budget per group) | index | einsum (per-expert capacity). grouped computes the
    # rows top-p selects, not E * capacity: 40 steps of this config ran at 1867 tokens/s against
    # index's 1512 (alternating, 2 CPU cores), and its budget of 1.25 x 2 per token drops none.
    c.moe.dispatch = "grouped"
    c.moe.block_size = 32  # grouped: rows per block of the grouped matmul
    c.moe.matmul_backend = config_dict.placeholder(str)  # None: by platform | blocks | ragged_dot
    c.moe.drop_order = "rank"  # grouped: an overflowing group drops later ranks first | weight
    c.moe.renormalize = config_dict.placeholder(bool)  # None = paper (top-k only)

    c.loss = ConfigDict()
    c.loss.load_balance_weight = 1e-2
    c.loss.dynamic_weight = 1e-4
    c.loss.z_loss_weight = 0.0
    return c
