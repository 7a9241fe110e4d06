from models.vim import VARIANTS, VisionMamba, VimConfig, build_model, vim_config  # noqa: F401
from models.weights import load_model  # noqa: F401
