# Environment shared by the demo, the tests and CI (sourced, not run).
export RAY_USAGE_STATS_ENABLED=0        # closed network: no usage-stats calls
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # local Rays of the tests and benchmarks listen on loopback only
unset RAY_AUTH_MODE                     # Ray's token auth stays on (actors/ray_runtime.close_local_ray)
export HF_HUB_OFFLINE=1                 # never reach a model hub
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export VITA_AUDIO_CACHE=${VITA_AUDIO_CACHE:-$PWD/.cache/vita-audio}
