# CPU smoke profile: the whole recipe end to end on any machine, in minutes.
#
#   bash run.sh --config configs/smoke.sh
#
# Same stages and scripts as the GPU recipe, with these stand-ins (nothing is downloaded):
# - the model is a tiny random CosyVoice2-shaped directory (real file layout) that
#   stage -1 builds and converts with the real conversion script;
# - the reward server runs the stand-in engines (token2wav_server/standin.py:
#   deterministic token -> audio -> text, no weights) on CPU, and is stopped at the end;
# - stage 2 runs the preflight and composes the veRL config, then stops: GRPO steps
#   need CUDA GPUs (veRL 0.9.1 rollouts are vLLM/SGLang servers);
# - stage 3 first writes real FSDP checkpoints of the tiny model on CPU (torchrun,
#   gloo, veRL's checkpoint manager, small perturbations standing in for training)
#   and then merges them with veRL's merger like after a real run.
stage=${stage:--1}
stop_stage=${stop_stage:-6}

: "${exp_name=smoke}"
: "${exp_dir=exp/smoke}"
: "${pretrained_dir=$exp_dir/pretrained}"
: "${model_source=tiny}"
: "${train_file=assets/zh_texts.jsonl}"
: "${test_file=}"
: "${test_size=24}"
: "${data_dir=$exp_dir/data}"
: "${CUDA_VISIBLE_DEVICES=}"
: "${n_gpus_per_node=1}"
: "${server_engines=token2wav_server.standin:create_engines}"
: "${server_devices=cpu}"
: "${http_port=18000}"
: "${grpc_port=18001}"
: "${metrics_port=18002}"
: "${stop_server_at_exit=true}"
: "${cpu_checkpoint_steps=1 2}"
: "${train_batch_size=8}"
: "${ppo_mini_batch_size=4}"
: "${micro_batch_size_per_gpu=2}"
: "${eval_manifest=assets/smoke_eval.jsonl}"
: "${eval_set_name=smoke}"
: "${eval_nproc=2}"
: "${eval_master_port=29512}"
: "${infer_args=--batch-size 4 --max-new-tokens 40 --seed 0}"
: "${synth_args=--max-new-tokens 40}"
export TTSRL_COMPOSE_ONLY=1

source configs/default.sh
