from omnilm.model.layers import KVCache
from omnilm.model.omni import ModelOutput, OmniModel

__all__ = ["KVCache", "ModelOutput", "OmniModel"]
