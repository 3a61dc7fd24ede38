r"""DistilBERT recipe (Sanh et al., 2019): bert-base-uncased -> 6-layer student.

Launch (one host; `launch_tpu.sh` runs the same on every TPU worker):

  python -m flaxdistil.main --config configs/distilbert.py --workdir /tmp/distilbert \
      --config.data.train_files='("/data/wiki/train.txt",)' \
      --config.data.eval_files='("/data/wiki/valid.txt",)'

Global batch 4096 sequences of 128 tokens (the paper's 4K examples per batch),
reached through `optim.num_microbatches` gradient accumulation on small hardware.
Expected result (paper, Table 1): the student keeps ~97% of BERT-base's GLUE
score; on a held-out masked-token set its accuracy approaches the teacher's.
"""

import ml_collections

from flaxdistil.training import sharding


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42                       # params init, data order, masking, dropout
  c.num_train_steps = 100_000       # optimizer steps (each one global batch)
  c.steps_per_run = 0               # >0: checkpoint and exit after this many steps (job slots)
  c.log_every_steps = 50            # console + metrics.jsonl + TensorBoard
  c.eval_every_steps = 2_000        # held-out evaluation (also at the end)
  c.eval_at_start = False           # also evaluate the initial student (step 0): the baseline
  c.checkpoint_every_steps = 1_000  # Orbax save interval
  c.dtype = 'float32'               # compute dtype: 'float32' | 'bfloat16' (params stay fp32)
  c.remat = False                   # rematerialise each layer in the backward pass
  c.attention_implementation = ''   # jax.nn.dot_product_attention where no attention dropout
                                    # applies (teacher forward, eval): '' = JAX's default (XLA) |
                                    # 'xla' | 'cudnn' (cuDNN flash attention: GPU + bfloat16)
  c.scan_layers = False             # encoder layers as one lax.scan: compiles one layer, not L
                                    # (same params and results; layers of unequal shapes unroll)

  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = 'bert-base-uncased'  # HF dir or hub name (config.json + safetensors/bin)
  c.teacher.random_init = False         # True: random teacher of the shape below (tests only)
  c.teacher.hidden_size = 768           # shape fields: used only with random_init
  c.teacher.num_hidden_layers = 12
  c.teacher.num_attention_heads = 12
  c.teacher.intermediate_size = 3072
  c.teacher.max_position_embeddings = 512
  c.teacher.logical_axis_rules = ()     # () = shard like the student (mesh.logical_axis_rules)
  # Offline distillation (flaxdistil/data/teacher_cache.py): build with
  # `python -m flaxdistil.cache_teacher --config ... --out DIR`, train with teacher.cache=DIR.
  c.teacher.cache = ''                  # cache dir: use stored teacher targets, no teacher forward
  c.teacher.cache_top_k = 64            # k stored at build; at training: k used (<= stored k);
                                        # 0 = all (build: k = vocab_size; training: stored k)
  c.teacher.cache_values_dtype = 'bfloat16'  # stored top-k logits: bfloat16 | float16 | float32
  c.teacher.cache_hidden_dtype = 'bfloat16'  # stored last hidden state (alpha_cos) and the
                                        # intermediate layers the distill alphas read; '' = none
  c.teacher.cache_hidden_layers = ()    # more teacher hidden_states to store (0 = embeddings,
                                        # -1 = last), e.g. all of them for layer-map sweeps
  c.teacher.cache_teacher_input = 'original'  # build: the teacher sees the 'original' packed rows
                                        # (any seed/batch size/masking can train from the cache) or
                                        # this run's 'masked' stream (as online KD; serves only
                                        # runs with the same seed, global_batch_size and masking)
  c.teacher.cache_tail_bucket = True    # sparse KL: teacher's tail mass as a (k+1)-th bucket
                                        # (False: top-k renormalised; far worse on a flat
                                        # teacher, NOTES_issue10.md)

  c.student = ml_collections.ConfigDict()
  c.student.init = 'teacher'        # 'teacher' (DistilBERT init) | 'random' | 'pretrained'
  c.student.path = ''               # HF dir for init='pretrained' (its shape is kept)
  c.student.model_type = 'distilbert'  # 'bert' only to fine-tune a BERT (configs/glue.py:teacher)
  c.student.num_hidden_layers = 6   # depth; teacher layers round(linspace(0, Lt-1, Ls))
  c.student.layers = ()             # explicit teacher layer list, () = the rule above
  c.student.hidden_size = 0         # 0 = teacher's (0 everywhere below too)
  c.student.num_attention_heads = 0
  c.student.intermediate_size = 0
  c.student.max_position_embeddings = 0
  c.student.hidden_dropout_prob = 0.1
  c.student.attention_probs_dropout_prob = 0.1
  c.student.classifier_dropout = 0.1   # classification head (data.task); HF seq_classif_dropout

  c.distill = ml_collections.ConfigDict()
  c.distill.temperature = 2.0       # softmax temperature T of the KL term
  c.distill.alpha_ce = 5.0          # T^2 KL(teacher || student) weight
  c.distill.alpha_mlm = 2.0         # masked-LM cross-entropy weight
  c.distill.alpha_cos = 1.0         # cosine loss on last hidden states
  c.distill.alpha_mse = 0.0         # MSE between logits
  c.distill.alpha_task = 0.0        # cross-entropy with gold labels (data.task only)
  c.distill.teacher_input = 'masked'  # online teacher sees the 'masked' input (HF distiller) or
                                      # the 'original' tokens (what a teacher.cache stores)
  c.distill.restrict_ce_to_mask = False  # KL over masked tokens only (else all non-pad)
  c.distill.max_predictions_per_seq = 0  # >0: MLM heads only on <= this many masked positions
                                         # per sequence (needs restrict_ce_to_mask; ~3x faster
                                         # for small models whose vocab projection dominates)
  c.distill.vocab_chunk_size = 0    # >0: vocab terms this many positions at a time, no [B, T, V] logits
                                    # (same values; dense anyway with teacher.cache: its KL is sparse)
  # TinyBERT (Jiao et al., 2020) / MiniLM (Wang et al., 2020) intermediate-layer terms:
  c.distill.alpha_emb = 0.0         # MSE of embedding outputs (through a projection if narrower)
  c.distill.alpha_hidden = 0.0      # MSE of hidden states of mapped layer pairs
  c.distill.alpha_attn_score = 0.0  # MSE of attention scores of mapped layers (equal heads)
  c.distill.alpha_attn_kl = 0.0     # KL of last-layer attention distributions (MiniLM)
  c.distill.alpha_value_kl = 0.0    # KL of last-layer value relations (MiniLM)
  c.distill.layer_map = ()          # teacher layer per student layer, () = uniform i*k + k - 1
  c.distill.num_relation_heads = 0  # value-relation heads, 0 = attention heads (MiniLMv2 R)
  c.distill.relation_teacher_layer = -1  # teacher layer for the MiniLM terms
  c.distill.mlm_probability = 0.15  # fraction of tokens predicted (80/10/10)
  c.distill.mlm_smoothing = 0.0     # >0: HF distiller's frequency-smoothed masking (0.7 there)

  c.data = ml_collections.ConfigDict()
  c.data.task = ''                  # '' = masked-LM distillation on text; 'sst2' | 'mrpc' = GLUE
                                    # sequence classification (train_files/eval_files = TSVs)
  c.data.train_files = ()           # local text (.txt: blank line = document) / .json(l) / .parquet
  c.data.eval_files = ()            # held-out files for evaluation
  c.data.tokenizer = ''             # '' = the teacher's tokenizer (teacher.path)
  c.data.synthetic = False          # generate a small corpus + tokenizer in the workdir
  c.data.dataset = ''               # instead of train_files: a hub dataset name or a local dir
                                    # laid out like one (data/train-*.parquet|jsonl), read as
                                    # datasets.load_dataset(dataset, split=dataset_split)
  c.data.dataset_split = 'train'    # split of data.dataset to train on
  c.data.dataset_eval_split = ''    # split of data.dataset to evaluate on ('' = data.eval_files)
  c.data.text_column = 'text'       # document column of json/parquet files and data.dataset
  c.data.streaming = False          # pack on the fly without a cache: corpus order, no shuffling,
                                    # resume re-reads (the sharded cache has neither limit)
  c.data.num_proc = 0               # tokenisation processes on a cache miss (0 = all CPUs)
  c.data.max_seq_length = 128       # tokens per packed sequence incl. [CLS]/[SEP]
  c.data.global_batch_size = 4096   # sequences per optimizer step (all hosts)
  c.data.eval_batch_size = 64       # sequences per eval batch
  c.data.eval_num_sequences = 4096  # held-out sequences evaluated (0 = all)
  c.data.cache_dir = ''             # token shard cache shared by runs ('' = $FLAXDISTIL_CACHE or
                                    # ~/.cache/flaxdistil); keyed by files + tokenizer

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 5e-4      # peak LR (HF distiller default)
  c.optim.warmup_steps = 5_000      # linear warmup (5% of steps), then linear decay to 0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01       # not applied to LayerNorm and biases
  c.optim.grad_clip_norm = 5.0      # global-norm clipping (HF distiller max_grad_norm)
  c.optim.num_microbatches = 64     # gradient accumulation: 4096 = 64 x 64
  c.optim.on_nonfinite = 'skip'     # 'skip' the update and count it, or 'stop'
  c.optim.max_consecutive_nonfinite = 100  # 'skip': stop once this many steps in a row were
                                    # non-finite (the student stopped learning); 0 = never

  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ('data', 'fsdp', 'tensor')
  c.mesh.shape = (-1, 1, 1)         # -1 = the rest; (1,-1,1) FSDP; (1,1,-1) tensor parallel
  # Logical axis -> mesh axes (MaxText/t5x style), defined once in flaxdistil/training/sharding.py.
  c.mesh.logical_axis_rules = sharding.DEFAULT_LOGICAL_AXIS_RULES

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 3      # newest K steps kept
  c.checkpoint.async_save = True    # write in the background while training goes on
  return c
