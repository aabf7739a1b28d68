"""Foreign names: the option names of TRL/transformers, open-instruct, Fast-LLM, axolotl and LLaMA-Factory
(and torchtune) mapped to the sftlab key a user means: RENAMES, the names whose value carries over as it is
(what `sftlab convert-config` copies, migrate/), and ALIASES, every name the did-you-mean of an unknown key knows.

Every value is a full dotted key; `data.train.N.x` (a key of each source) becomes `data.train.0.x` /
`data.eval.1.x` when the unknown key sits inside a source. docs/migrating.md tabulates the same
names per tool and a test checks every mapped row against `suggest_key`.
"""

from __future__ import annotations

SRC = "data.train.N."

# another tool's name for an sftlab key whose value carries over as it is: `sftlab convert-config` copies
# these (whichever tool the file is from), and the did-you-mean knows them through ALIASES
RENAMES = {
    # transformers TrainingArguments, TRL SFTConfig / ModelConfig / ScriptArguments, LLaMA-Factory (transformers' names)
    "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay", "max_grad_norm": "optim.max_grad_norm",
    "adam_epsilon": "optim.eps", "warmup_ratio": "optim.warmup_ratio",
    "per_device_train_batch_size": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum_steps",
    "num_train_epochs": "train.num_epochs", "seed": "train.seed", "output_dir": "train.output_dir",
    "gradient_checkpointing": "train.gradient_checkpointing", "neftune_noise_alpha": "train.neftune_alpha",
    "overwrite_output_dir": "train.overwrite", "torch_compile": "train.compile",
    "torch_compile_backend": "train.compile_backend", "use_liger_kernel": "train.liger",
    "use_liger": "train.liger", "full_determinism": "train.deterministic",
    "load_best_model_at_end": "train.load_best_model_at_end", "trust_remote_code": "model.trust_remote_code",
    "model_name_or_path": "model.name_or_path", "model_revision": "model.revision",
    "eval_packing": "data.eval_packing", "max_length": "data.max_seq_length", "max_seq_length": "data.max_seq_length",
    "dataset_num_proc": "data.num_proc", "preprocessing_num_workers": "data.num_proc",
    "save_total_limit": "checkpoint.keep_last", "model_init_kwargs": "model.init_kwargs",
    "enable_liger_kernel": "train.liger", "cutoff_len": "data.max_seq_length", "val_size": "data.eval_fraction",
    "push_to_hub": "train.push_to_hub", "hub_model_id": "train.hub_model_id", "hub_private_repo": "train.hub_private",
    # axolotl
    "base_model": "model.name_or_path", "revision_of_model": "model.revision", "tokenizer_config": "model.tokenizer",
    "cosine_min_lr_ratio": "optim.min_lr_ratio", "micro_batch_size": "train.micro_batch_size",
    "num_epochs": "train.num_epochs", "sequence_len": "data.max_seq_length", "val_set_size": "data.eval_fraction",
    "eval_sample_packing": "data.eval_packing", "dataset_processes": "data.num_proc",
}

ALIASES = {
    # RENAMES, less those that are sftlab's own leaf names (the did-you-mean finds those by itself)
    **{name: key for name, key in RENAMES.items() if not key.endswith("." + name)},
    # the Hub (TRL / transformers, LLaMA-Factory, axolotl), continuing an adapter (axolotl)
    "hf_repo_id": "train.hub_model_id", "lora_model_dir": "model.name_or_path",
    # TRL SFTConfig / transformers TrainingArguments / TRL ModelConfig and ScriptArguments
    "lr_scheduler_type": "optim.scheduler", "lr_scheduler_kwargs": "optim.min_lr_ratio", "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas", "optim": "optim.name", "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every", "eval_strategy": "train.eval_every", "evaluation_strategy": "train.eval_every",
    "save_steps": "checkpoint.every_steps", "save_strategy": "checkpoint.every_steps",
    "metric_for_best_model": "train.metric_for_best", "bf16": "train.mixed_precision", "fp16": "train.mixed_precision",
    "resume_from_checkpoint": "train.resume", "group_by_length": "train.micro_batch_tokens",
    "chat_template_path": "data.chat_template", "dataset_text_field": SRC + "columns",
    "packing_strategy": "data.packing", "padding_free": "data.packing", "completion_only_loss": "data.loss_on",
    "assistant_only_loss": "data.loss_on", "response_template": "data.response_template",
    "instruction_template": "data.instruction_template", "torch_dtype": "model.dtype", "dtype": "model.dtype",
    "use_peft": "peft.method", "lora_r": "peft.r", "lora_alpha": "peft.alpha", "lora_dropout": "peft.dropout",
    "lora_target_modules": "peft.target_modules", "lora_modules_to_save": "peft.modules_to_save",
    "use_dora": "peft.method", "load_in_4bit": "peft.quantize", "load_in_8bit": "peft.quantize",
    "bnb_4bit_quant_type": "peft.quantize", "dataset_name": SRC + "path", "dataset_config": SRC + "subset",
    "dataset_train_split": SRC + "split", "dataset_test_split": "data.eval.N.split",
    # alignment-handbook's data arguments (TRL configs)
    "dataset_mixer": "data.train", "dataset_mixture": "data.train", "dataset_splits": SRC + "split",
    "dataset_configs": SRC + "subset",
    # open-instruct finetune.py
    "use_flash_attn": "model.attn_implementation", "low_cpu_mem_usage": "model.init_kwargs",
    "dataset_mixer_list": "data.train", "dataset_mixer_list_splits": SRC + "split",
    "dataset_config_name": SRC + "subset", "dataset_local_cache_dir": "data.cache_dir",
    "max_train_samples": SRC + "weight", "clip_grad_norm": "optim.max_grad_norm", "lora_rank": "peft.r",
    "use_lora": "peft.method", "use_qlora": "peft.quantize", "use_8bit_optimizer": "optim.name",
    "max_train_steps": "train.max_steps", "checkpointing_steps": "checkpoint.every_steps",
    "keep_last_n_checkpoints": "checkpoint.keep_last", "with_tracking": "train.report_to",
    "additional_model_arguments": "model.init_kwargs", "tokenizer_name": "model.tokenizer",
    "tokenizer_name_or_path": "model.tokenizer", "chat_template_name": "data.chat_template",
    "final_lr_ratio": "optim.min_lr_ratio", "clean_checkpoints_at_end": "checkpoint.delete_at_end",
    # Fast-LLM (leaves of its nested sections)
    "train_iters": "train.max_steps", "maximum_document_length": "data.max_seq_length",
    "sequence_length": "data.max_seq_length", "truncate_documents": "data.packing",
    "use_loss_masking_spans": SRC + "format", "loss_masking_spans": SRC + "columns", "decay_style": "optim.scheduler",
    "warmup_iterations": "optim.warmup_steps", "beta_1": "optim.betas", "beta_2": "optim.betas", "epsilon": "optim.eps",
    "gradient_norm_clipping": "optim.max_grad_norm", "compute_dtype": "train.mixed_precision",
    "training_dtype": "train.mixed_precision", "use_flash_attention": "model.attn_implementation",
    "experiment_dir": "train.output_dir", "eval_iters": "train.eval_max_batches",
    "max_eval_batches": "train.eval_max_batches", "export": "checkpoint.save_hf_model",
    "resize_to_multiple_of": "data.pad_vocab_to_multiple_of",
    # axolotl
    "adapter": "peft.method", "datasets": "data.train", "test_datasets": "data.eval", "type": SRC + "format",
    "data_files": SRC + "path", "field_messages": SRC + "columns", "message_field_role": SRC + "columns",
    "message_field_content": SRC + "columns", "message_property_mappings": SRC + "columns",
    "train_on_inputs": "data.loss_on", "roles_to_train": "data.loss_on", "dataset_prepared_path": "data.cache_dir",
    "chat_template_jinja": "data.chat_template", "excess_length_strategy": "data.on_overlength",
    "sample_packing": "data.packing", "optimizer": "optim.name", "lr_scheduler": "optim.scheduler",
    "flash_attention": "model.attn_implementation", "sdp_attention": "model.attn_implementation",
    "attention": "model.attn_implementation", "saves_per_epoch": "checkpoint.every_epoch",
    "auto_resume_from_checkpoints": "train.resume", "lora_target_linear": "peft.target_modules",
    "peft_use_dora": "peft.method", "peft_use_rslora": "peft.use_rslora", "wandb_project": "train.report_to",
    "lora_bias": "peft.bias",
    # LLaMA-Factory arguments and dataset_info.json
    "quantization_bit": "peft.quantize", "flash_attn": "model.attn_implementation", "attn": "model.attn_implementation",
    "finetuning_type": "peft.method", "lora_target": "peft.target_modules", "additional_target": "peft.modules_to_save",
    "dataset": "data.train", "dataset_dir": SRC + "path", "eval_dataset": "data.eval", "template": "data.chat_template",
    "max_samples": SRC + "weight", "neat_packing": "data.packing", "train_on_prompt": "data.loss_on",
    "mask_history": "data.loss_on", "tokenized_path": "data.cache_dir", "file_name": SRC + "path",
    "hf_hub_url": SRC + "path", "formatting": SRC + "format", "num_samples": SRC + "weight", "tags": SRC + "columns",
    # torchtune and other common spellings
    "lr_scheduler_name": "optim.scheduler", "batch_size": "train.micro_batch_size",
    "micro_batch": "train.micro_batch_size", "gradient_accumulation": "train.grad_accum_steps",
    "epochs": "train.num_epochs", "max_seq_len": "data.max_seq_length", "seq_len": "data.max_seq_length",
    "warmup": "optim.warmup_ratio", "precision": "train.mixed_precision", "max_grad_norm_clip": "optim.max_grad_norm",
    "gradient_clipping": "optim.max_grad_norm", "output": "train.output_dir",
}
