"""The data, where a reader starts: what each part is and the module that holds it. Each module is one concern; this
file only re-exports their names, so code written against data.py imports what it always did (the project's own
modules import from where a name lives):

    synthtouch.py      SynthTouch, the testbed whose latent factors are known
    layouts.py         real data by folder layout (LAYOUTS): TVL prepared as TVL prepares it, your own CSV files
    stand_ins.py       datasets written in those layouts (SynthTouch as TVL, scikit-learn's digits as CSV)
    images.py          images from files, PIL or tensors as the encoders take them
    feature_cache.py   frozen features computed once, memory-mapped (cached_features); features.py, their shape
    seed_api.py        the seed package's names: ImageTextDataset, create_dataloader, set_seed, get_device"""
from feature_cache import cached_features, collate
from images import image_batch, load_image, open_image
from layouts import CSVDataset, TVLDataset, csv_columns, csv_modalities, tvl_touch, tvl_vision, write_csv
from seed_api import ImageTextDataset, create_dataloader, get_device, set_seed
from stand_ins import write_csv_dataset, write_digits_csv, write_tvl_layout
from synthtouch import SynthTouch
