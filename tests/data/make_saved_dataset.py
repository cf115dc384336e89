"""How tests/data/saved_dataset was written: by datasets' own save_to_disk (datasets 5.2.0), once, in a scratch
venv (`pip install datasets==5.2.0`; the project does not depend on it). Run from the repository root:
`HF_DATASETS_OFFLINE=1 python tests/data/make_saved_dataset.py tests/data/saved_dataset`."""

import sys

from datasets import Dataset

texts = [None if i % 7 == 3 else f"Document {i} is about the river and the city." for i in range(60)]
Dataset.from_dict({"text": texts, "id": list(range(60))}).save_to_disk(sys.argv[1], num_shards=2)
