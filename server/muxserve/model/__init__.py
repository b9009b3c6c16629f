"""MUX-BERT model code; stands on its own (imports nothing from the server)."""

from muxserve.model.muxbert import MuxBertConfig, MuxBertModel

__all__ = ["MuxBertConfig", "MuxBertModel"]
