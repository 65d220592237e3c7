"""Prompt templates and class names of every task, as the originals use them (METHODS.md §1.3, §5).

Templates are format strings with `{c}`. The 8 core tasks' templates and names are identical in
task_vectors, AdaMerging, Surgery, SurgeryV2, EMR and tall_masks; the 14/20-task extras follow
tall_masks (TSV differs for STL10 and EMNIST, §5.2). A `<Task>Val` name uses its base task's.

Where the originals derive class names from the data (SUN397 and DTD folder names, EuroSAT folder
names mapped to OpenAI's wording, Cars' `cars_meta.mat`), the mapping lives here as a small pure
function and the reader in `real.py` applies it to what it finds on disk.
"""
from __future__ import annotations

import re

# ---------------------------------------------------------------- templates of the 8 core tasks
SUN397_TEMPLATES = ["a photo of a {c}.", "a photo of the {c}."]

CARS_TEMPLATES = [
    "a photo of a {c}.",
    "a photo of the {c}.",
    "a photo of my {c}.",
    "i love my {c}!",
    "a photo of my dirty {c}.",
    "a photo of my clean {c}.",
    "a photo of my new {c}.",
    "a photo of my old {c}.",
]

RESISC45_TEMPLATES = [
    "satellite imagery of {c}.",
    "aerial imagery of {c}.",
    "satellite photo of {c}.",
    "aerial photo of {c}.",
    "satellite view of {c}.",
    "aerial view of {c}.",
    "satellite imagery of a {c}.",
    "aerial imagery of a {c}.",
    "satellite photo of a {c}.",
    "aerial photo of a {c}.",
    "satellite view of a {c}.",
    "aerial view of a {c}.",
    "satellite imagery of the {c}.",
    "aerial imagery of the {c}.",
    "satellite photo of the {c}.",
    "aerial photo of the {c}.",
    "satellite view of the {c}.",
    "aerial view of the {c}.",
]

EUROSAT_TEMPLATES = [
    "a centered satellite photo of {c}.",
    "a centered satellite photo of a {c}.",
    "a centered satellite photo of the {c}.",
]

NUMBER_TEMPLATES = ['a photo of the number: "{c}".']  # SVHN and MNIST

GTSRB_TEMPLATES = [
    'a zoomed in photo of a "{c}" traffic sign.',
    'a centered photo of a "{c}" traffic sign.',
    'a close up photo of a "{c}" traffic sign.',
]

DTD_TEMPLATES = [
    "a photo of a {c} texture.",
    "a photo of a {c} pattern.",
    "a photo of a {c} thing.",
    "a photo of a {c} object.",
    "a photo of the {c} texture.",
    "a photo of the {c} pattern.",
    "a photo of the {c} thing.",
    "a photo of the {c} object.",
]

# ---------------------------------------------------------------- the tall_masks extras (14/20 tasks)
# CIFAR10 and CIFAR100 share this list.
CIFAR_TEMPLATES = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
]

TEMPLATES: dict[str, list[str]] = {
    "SUN397": SUN397_TEMPLATES,
    "Cars": CARS_TEMPLATES,
    "RESISC45": RESISC45_TEMPLATES,
    "EuroSAT": EUROSAT_TEMPLATES,
    "SVHN": NUMBER_TEMPLATES,
    "GTSRB": GTSRB_TEMPLATES,
    "MNIST": NUMBER_TEMPLATES,
    "DTD": DTD_TEMPLATES,
    "STL10": ["a photo of a {c}.", "a photo of the {c}."],
    "OxfordIIITPet": ["a photo of a {c}, a type of pet."],
    "Flowers102": ["a photo of a {c}, a type of flower."],
    "CIFAR100": CIFAR_TEMPLATES,
    "PCAM": ["this is a photo of {c}"],
    "FER2013": [
        "a photo of a {c} looking face.",
        "a photo of a face showing the emotion: {c}.",
        "a photo of a face looking {c}.",
        "a face that looks {c}.",
        "they look {c}.",
        "look at how {c} they are.",
    ],
    "CIFAR10": CIFAR_TEMPLATES,
    "Food101": ["a photo of {c}, a type of food."],
    "FashionMNIST": ["a photo of a {c}.", "a photo of the {c}."],
    "RenderedSST2": ["a {c} review of a movie."],
    "EMNIST": ['a photo of the digit character: "{c}".'],
    "KMNIST": ["a photo of the character {c}."],
}

# Where TSV (task_singular_vectors) prompts differently from tall_masks (METHODS.md §5.2): one list
# for STL10 and CIFAR, and SVHN's number prompt for EMNIST. Every other task is the same in both.
TSV_TEMPLATES: dict[str, list[str]] = {"STL10": CIFAR_TEMPLATES, "EMNIST": NUMBER_TEMPLATES}
TEMPLATE_FAMILIES = ("tall_masks", "tsv")

# ---------------------------------------------------------------- class names that are fixed lists
DIGITS = [str(d) for d in range(10)]  # SVHN, MNIST, EMNIST "digits"

# NWPU-RESISC45 folder names, alphabetical: labels come from the sorted folders, names from this list.
RESISC45_FOLDERS = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral",
    "church", "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert",
    "forest", "freeway", "golf_course", "ground_track_field", "harbor", "industrial_area",
    "intersection", "island", "lake", "meadow", "medium_residential", "mobile_home_park",
    "mountain", "overpass", "palace", "parking_lot", "railway", "railway_station",
    "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]

# DTD's 47 texture folders (dtd/images/<class>), alphabetical like RESISC45's.
DTD_FOLDERS = [
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
    "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
    "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
]

# EuroSAT's 10 land-cover folders (EuroSAT_splits/<split>/<class>), alphabetical.
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
                   "Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]

# GTSRB's training folders are the class ids 0..42, zero-padded.
GTSRB_FOLDERS = [f"{c:05d}" for c in range(43)]

# SUN397's folder names and Cars' class names are not fixed by a list here (the originals read
# them from the data), only their number.
SUN397_CLASS_COUNT = 397
CARS_CLASS_COUNT = 196

# OpenAI's CLIP prompt list (data/prompts.md), in GTSRB class-id order 0..42; spelling as in the
# originals ("horizonal", "bicyle") because the cached heads were built from these exact strings.
GTSRB_CLASSNAMES = [
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]

# EuroSAT folder names → OpenAI's wording, via the originals' two steps (CamelCase → words, then
# the table). Keys are the intermediate "pretty" names.
EUROSAT_TO_OPENAI = {
    "annual crop": "annual crop land",
    "forest": "forest",
    "herbaceous vegetation": "brushland or shrubland",
    "highway": "highway or road",
    "industrial area": "industrial buildings or commercial buildings",
    "pasture": "pasture land",
    "permanent crop": "permanent crop land",
    "residential area": "residential buildings or homes or apartments",
    "river": "river",
    "sea lake": "lake or sea",
}

FLOWERS102_CLASSNAMES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe flower", "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily",
    "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth", "corn poppy",
    "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose",
    "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue", "wallflower",
    "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia", "wild pansy",
    "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink and yellow dahlia", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant", "foxglove",
    "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]

# tall_masks gives FER2013 synonym lists and formats each *list* into the templates, so the prompts
# read "a photo of a ['happy', 'smiling'] looking face."; the names here are those strings, in
# FER2013's label order (angry, disgust, fear, happy, sad, surprise, neutral).
FER2013_SYNONYMS = [["angry"], ["disgusted"], ["fearful"], ["happy", "smiling"], ["sad", "depressed"],
                    ["surprised", "shocked", "spooked"], ["neutral", "bored"]]
# FER2013's own class names (the Kaggle challenge's), in its label order.
FER2013_NAMES = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]

# Fixed lists only. Not here because the originals read them from the data files: SUN397, DTD,
# EuroSAT, Cars (functions below), CIFAR100, Food101, OxfordIIITPet (torchvision's `.classes`).
CLASSNAMES: dict[str, list[str]] = {
    "RESISC45": [c.replace("_", " ") for c in RESISC45_FOLDERS],
    "SVHN": DIGITS,
    "GTSRB": GTSRB_CLASSNAMES,
    "MNIST": DIGITS,
    "STL10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
    "Flowers102": FLOWERS102_CLASSNAMES,
    "PCAM": ["lymph node", "lymph node containing metastatic tumor tissue"],
    "CIFAR10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"],
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"],
    "RenderedSST2": ["negative", "positive"],
    "EMNIST": DIGITS,
    "KMNIST": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    "FER2013": [str(synonyms) for synonyms in FER2013_SYNONYMS],
}

# Class counts of the tasks whose names come from the data.
DATA_NAMED_COUNTS = {"SUN397": SUN397_CLASS_COUNT, "Cars": CARS_CLASS_COUNT, "CIFAR100": 100,
                     "Food101": 101, "OxfordIIITPet": 37}


def base_task(name: str) -> str:
    """`MNISTVal` → `MNIST`: a validation split shares its task's templates, names and head."""
    return name[: -len("Val")] if name.endswith("Val") else name


def get_templates(name: str, family: str = "tall_masks") -> list[str]:
    """The task's prompts; `family="tsv"` gives TSV's where it differs from tall_masks'."""
    base = base_task(name)
    if base not in TEMPLATES:
        raise ValueError(f"no prompt templates for task {name!r}; known: {sorted(TEMPLATES)}")
    if family not in TEMPLATE_FAMILIES:
        raise ValueError(f"unknown template family {family!r}; expected one of {TEMPLATE_FAMILIES}")
    return list(TSV_TEMPLATES.get(base, TEMPLATES[base]) if family == "tsv" else TEMPLATES[base])


# ---------------------------------------------------------------- names derived from the data
def oxford_pet_classname(image_id: str) -> str:
    """`american_pit_bull_terrier_12` → `American Pit Bull Terrier`, as torchvision names the breeds."""
    return " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))


def sun397_classname(folder: str) -> str:
    """`a_abbey` → `abbey`: SUN397 folders carry a one-letter prefix and an underscore."""
    return folder[2:].replace("_", " ")


def dtd_classname(folder: str) -> str:
    return folder.replace("_", " ")


def cars_classname(meta_name: str) -> str:
    """A `cars_meta.mat` class name as the head uses it (the originals also map `_` to space)."""
    return meta_name.replace("_", " ")


def eurosat_classname(folder: str) -> str:
    """`HerbaceousVegetation` → `brushland or shrubland` (OpenAI's wording); KeyError if unknown."""
    words = " ".join(w.lower() for w in re.findall(r"[A-Z](?:[a-z]+|[A-Z]*(?=[A-Z]|$))",
                                                      folder.replace("_", " ")))
    # "Industrial" and "Residential" become "... area" before the table, as in the originals.
    if words.endswith("al"):
        words += " area"
    return EUROSAT_TO_OPENAI[words]


def normalized_classname(name: str) -> str:
    """A class name compared without case, spaces and punctuation ("Annual_Crop" = "annual crop")."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def class_order_problem(data_names: list[str], spellings: list[list[str]]) -> tuple[int, int | None] | None:
    """The first label whose name is not the class of the same index, or None when every name is.

    `spellings[j]` are the accepted names of class j (ours, FusionBench's, the folder names), compared
    by `normalized_classname`; a spelling shared by two classes says nothing and is dropped. Returns
    (i, j): the data's label i carries class j's name (j != i), or (i, None): its name is none of the
    classes' (a label order that cannot be checked, not one in the right place). A name that is
    another class's is reported before an unmatched one. A name that is a number ("7", "00007", as
    a folder of class ids) is that class id."""
    owners: dict[str, set[int]] = {}
    for j, names in enumerate(spellings):
        for name in names:
            owners.setdefault(normalized_classname(name), set()).add(j)
    index = {name: js.pop() for name, js in owners.items() if len(js) == 1}
    unmatched = None
    for i, name in enumerate(data_names):
        key = normalized_classname(name)
        j = int(key) if key.isdigit() and int(key) < len(spellings) else index.get(key)
        if j is None:
            own = {normalized_classname(n) for n in spellings[i]} if i < len(spellings) else set()
            if normalized_classname(name) not in own and unmatched is None:
                unmatched = (i, None)
        elif j != i:
            return i, j
    return unmatched
