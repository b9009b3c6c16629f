"""Uniform weight average ("soup") of models fine-tuned in one lineage, saved as a model folder.

Usage: python docs/training/v9-probes/soup.py OUT MODEL_DIR [MODEL_DIR ...]
(session 9: the average of rounds 4 and 5 of sst2-mux2, level with round 4 alone).
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
