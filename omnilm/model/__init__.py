from omnilm.model.layers import KVCache, RaggedKVCache
from omnilm.model.omni import ModelOutput, OmniModel

__all__ = ["KVCache", "RaggedKVCache", "ModelOutput", "OmniModel"]
