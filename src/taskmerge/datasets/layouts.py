"""What each task's files look like under `data_location`: the text a `DatasetLayoutError` shows.

Pure data, below every reader: real.py's `layout_error` reads it for the 8 tasks of real.py and the
11 folder tasks of tall_extras.py alike (FER2013 is a parquet snapshot, parquet.py names its own).
"""
from __future__ import annotations

DATA_README = "data/README.md"

# real.py: the 8 tasks of task_vectors / EnnengYang.
REAL_LAYOUTS = {
    "SUN397": """\
  sun397/
    train/<class folder, e.g. a_abbey>/*.jpg
    test/<class folder>/*.jpg      (EnnengYang's copy)  or  val/<class folder>/*.jpg  (task_vectors)""",
    "Cars": """\
  stanford_cars/
    cars_train/*.jpg
    cars_test/*.jpg
    devkit/cars_train_annos.mat
    devkit/cars_meta.mat
    devkit/cars_test_annos_withlabels.mat   (EnnengYang)  or  cars_test_annos_withlabels.mat  (task_vectors)""",
    "RESISC45": """\
  resisc45/
    NWPU-RESISC45/<class, e.g. airplane>/*.jpg   (45 class folders)
    resisc45-train.txt  resisc45-val.txt  resisc45-test.txt   (one file name per line)""",
    "EuroSAT": """\
  EuroSAT_splits/
    train/<ClassName, e.g. AnnualCrop>/*.jpg
    val/<ClassName>/*.jpg
    test/<ClassName>/*.jpg""",
    "SVHN": """\
  svhn/
    train_32x32.mat
    test_32x32.mat""",
    "GTSRB": """\
  gtsrb/
    GTSRB/Training/<class id 00000..00042>/*.ppm
    GTSRB/Final_Test/Images/*.ppm
    GT-final_test.csv   (';'-separated, columns Filename and ClassId)""",
    "MNIST": """\
  MNIST/raw/
    train-images-idx3-ubyte  train-labels-idx1-ubyte
    t10k-images-idx3-ubyte   t10k-labels-idx1-ubyte    (or the same names + .gz)""",
    "DTD": """\
  dtd/
    train/<class, e.g. banded>/*.jpg
    test/<class>/*.jpg      (EnnengYang's copy)  or  val/<class>/*.jpg  (task_vectors)""",
}

# tall_extras.py: the folder tasks tall_masks / TSV add.
TALL_EXTRAS_LAYOUTS = {
    "STL10": """\
  stl10/stl10_binary/
    train_X.bin  train_y.bin  test_X.bin  test_y.bin""",
    "OxfordIIITPet": """\
  OxfordIIITPet/oxford-iiit-pet/
    images/<breed>_<n>.jpg
    annotations/trainval.txt  annotations/test.txt   (lines: <image id> <class id 1..37> <species> <breed id>)""",
    "Flowers102": """\
  flowers102/flowers-102/
    jpg/image_00001.jpg ...
    imagelabels.mat  setid.mat""",
    "CIFAR100": """\
  cifar-100-python/
    train  test  meta        (the python pickles of the official release)""",
    "PCAM": """\
  PCAM/pcam/
    camelyonpatch_level_2_split_train_x.h5  camelyonpatch_level_2_split_train_y.h5
    camelyonpatch_level_2_split_test_x.h5   camelyonpatch_level_2_split_test_y.h5""",
    "CIFAR10": """\
  cifar-10-batches-py/
    data_batch_1 ... data_batch_5  test_batch  batches.meta""",
    "Food101": """\
  food101/food-101/
    images/<class>/<id>.jpg
    meta/train.json  meta/test.json""",
    "FashionMNIST": """\
  FashionMNIST/FashionMNIST/raw/   (or FashionMNIST/raw/)
    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte  (or + .gz)""",
    "RenderedSST2": """\
  RenderedSST2/rendered-sst2/
    train/{negative,positive}/*.png
    test/{negative,positive}/*.png""",
    "EMNIST": """\
  EMNIST/EMNIST/raw/   (or EMNIST/raw/)
    emnist-digits-train-images-idx3-ubyte  emnist-digits-train-labels-idx1-ubyte
    emnist-digits-test-images-idx3-ubyte   emnist-digits-test-labels-idx1-ubyte   (or + .gz)""",
    "KMNIST": """\
  KMNIST/KMNIST/raw/   (or KMNIST/raw/)
    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte  (or + .gz)""",
}

LAYOUTS = {**REAL_LAYOUTS, **TALL_EXTRAS_LAYOUTS}
