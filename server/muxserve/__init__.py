"""muxserve: a high-throughput inference server for data-multiplexed BERT classifiers."""

__version__ = "0.1.0"
