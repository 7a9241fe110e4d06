from models.vim import VARIANTS, VisionMamba, VimConfig, build_model, vim_config  # noqa: F401
