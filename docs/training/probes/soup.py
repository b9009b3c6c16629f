"""Uniform weight average ("soup") of models fine-tuned in one lineage, saved as a model folder.

Usage: python docs/training/probes/soup.py OUT MODEL_DIR [MODEL_DIR ...]
(docs/training.md: the average of sst2-mux2's fourth and fifth rounds, level with the fourth alone).
"""

import sys
from pathlib import Path

import torch

from muxserve.model.weights import TOKENIZER_FILE, load_model, save_model

out, sources = Path(sys.argv[1]), sys.argv[2:]
models = [load_model(source) for source in sources]
states = [m.state_dict() for m in models]
average = {key: sum(state[key].float() for state in states) / len(states) for key in states[0]}
models[0].load_state_dict(average)
save_model(models[0], out, dtype=torch.float32, tokenizer_file=Path(sources[0]) / TOKENIZER_FILE)
print(out)
