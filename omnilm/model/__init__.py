from omnilm.model.layers import KVCache, RaggedKVCache, StaticKVCache
from omnilm.model.omni import ModelOutput, OmniModel

__all__ = ["KVCache", "RaggedKVCache", "StaticKVCache", "ModelOutput", "OmniModel"]
