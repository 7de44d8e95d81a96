"""Words of the simulated world: the category tree, colours, attribute sets, title noise.

Pure data. Each leaf names the silhouette it is drawn with (`render.SHAPES`) and the
attribute family its items carry; synonyms feed both titles and text queries, so the
same product is described in several ways, as in a real marketplace.
"""

# department -> group -> leaf -> (shape, synonyms); the leaf's own name is its first synonym.
CATEGORY_TREE: dict[str, dict[str, dict[str, tuple[str, list[str]]]]] = {
    "Women": {
        "Tops": {
            "T-Shirts": ("tshirt", ["t-shirt", "tee", "tshirt"]),
            "Blouses": ("shirt", ["blouse", "shirt top"]),
            "Sweaters": ("sweater", ["sweater", "jumper", "pullover"]),
        },
        "Dresses": {
            "Casual Dresses": ("dress", ["dress", "day dress", "sundress"]),
            "Evening Dresses": ("dress", ["evening dress", "gown", "party dress"]),
        },
        "Bottoms": {
            "Skirts": ("skirt", ["skirt", "a-line skirt"]),
            "Jeans": ("trousers", ["jeans", "denim pants"]),
            "Shorts": ("shorts", ["shorts", "hot pants"]),
            "Leggings": ("trousers", ["leggings", "tights"]),
        },
    },
    "Men": {
        "Tops": {
            "T-Shirts": ("tshirt", ["t-shirt", "tee", "crew neck tee"]),
            "Polo Shirts": ("tshirt", ["polo", "polo shirt"]),
            "Dress Shirts": ("shirt", ["shirt", "dress shirt", "button-down"]),
            "Hoodies": ("sweater", ["hoodie", "sweatshirt"]),
        },
        "Outerwear": {
            "Jackets": ("jacket", ["jacket", "bomber"]),
            "Coats": ("jacket", ["coat", "overcoat", "trench coat"]),
            "Blazers": ("jacket", ["blazer", "suit jacket"]),
        },
        "Bottoms": {
            "Jeans": ("trousers", ["jeans", "denim"]),
            "Chinos": ("trousers", ["chinos", "trousers", "pants"]),
            "Shorts": ("shorts", ["shorts", "board shorts"]),
        },
    },
    "Shoes": {
        "Sneakers": {
            "Running Shoes": ("sneaker", ["running shoes", "runners", "trainers"]),
            "Casual Sneakers": ("sneaker", ["sneakers", "casual shoes", "kicks"]),
            "Basketball Shoes": ("sneaker", ["basketball shoes", "high tops"]),
        },
        "Boots": {
            "Ankle Boots": ("boot", ["ankle boots", "booties"]),
            "Rain Boots": ("boot", ["rain boots", "wellies"]),
            "Hiking Boots": ("boot", ["hiking boots", "trekking boots"]),
        },
        "Formal": {
            "Heels": ("heel", ["heels", "pumps", "stilettos"]),
            "Loafers": ("sneaker", ["loafers", "slip-ons"]),
        },
        "Sandals": {
            "Sandals": ("sandal", ["sandals", "strappy sandals"]),
            "Flip Flops": ("sandal", ["flip flops", "thongs"]),
            "Slides": ("sandal", ["slides", "pool slides"]),
        },
    },
    "Bags": {
        "Handbags": {
            "Tote Bags": ("handbag", ["tote", "tote bag", "shopper bag"]),
            "Shoulder Bags": ("handbag", ["shoulder bag", "purse"]),
            "Clutches": ("wallet", ["clutch", "evening bag"]),
        },
        "Backpacks": {
            "School Backpacks": ("backpack", ["school bag", "backpack", "bookbag"]),
            "Travel Backpacks": ("backpack", ["travel backpack", "rucksack"]),
            "Laptop Backpacks": ("backpack", ["laptop backpack", "laptop bag"]),
        },
        "Small Leather Goods": {
            "Wallets": ("wallet", ["wallet", "billfold"]),
            "Card Holders": ("wallet", ["card holder", "card case"]),
        },
    },
    "Accessories": {
        "Watches": {
            "Smart Watches": ("watch", ["smartwatch", "smart watch", "fitness watch"]),
            "Quartz Watches": ("watch", ["watch", "wristwatch", "analog watch"]),
        },
        "Headwear": {
            "Baseball Caps": ("cap", ["cap", "baseball cap", "snapback"]),
            "Bucket Hats": ("hat", ["bucket hat", "fisherman hat"]),
            "Sun Hats": ("hat", ["sun hat", "straw hat", "wide brim hat"]),
        },
        "Eyewear": {
            "Sunglasses": ("sunglasses", ["sunglasses", "shades"]),
            "Reading Glasses": ("sunglasses", ["reading glasses", "readers"]),
        },
        "Jewellery": {
            "Necklaces": ("necklace", ["necklace", "chain"]),
            "Pendants": ("necklace", ["pendant", "charm necklace"]),
        },
        "Scarves": {
            "Silk Scarves": ("scarf", ["silk scarf", "bandana"]),
            "Wool Scarves": ("scarf", ["wool scarf", "muffler"]),
        },
    },
    "Home": {
        "Kitchen": {
            "Mugs": ("mug", ["mug", "coffee mug", "cup"]),
            "Water Bottles": ("bottle", ["water bottle", "sports bottle"]),
            "Vacuum Flasks": ("bottle", ["thermos", "vacuum flask", "insulated bottle"]),
        },
        "Lighting": {
            "Desk Lamps": ("lamp", ["desk lamp", "table lamp", "reading lamp"]),
            "Floor Lamps": ("lamp", ["floor lamp", "standing lamp"]),
        },
        "Furniture": {
            "Dining Chairs": ("chair", ["dining chair", "chair"]),
            "Armchairs": ("chair", ["armchair", "lounge chair"]),
        },
        "Textiles": {
            "Cushions": ("pillow", ["cushion", "cushion cover"]),
            "Throw Pillows": ("pillow", ["throw pillow", "pillow"]),
        },
    },
    "Electronics": {
        "Phones": {
            "Smartphones": ("phone", ["smartphone", "phone", "mobile"]),
            "Phone Cases": ("phone", ["phone case", "phone cover"]),
        },
        "Audio": {
            "Headphones": ("headphones", ["headphones", "over-ear headphones"]),
            "Headsets": ("headphones", ["headset", "gaming headset"]),
        },
        "Computers": {
            "Laptops": ("laptop", ["laptop", "notebook"]),
            "Tablets": ("laptop", ["tablet", "pad"]),
        },
    },
    "Beauty": {
        "Fragrance": {
            "Perfume": ("perfume", ["perfume", "eau de parfum", "fragrance"]),
            "Body Mist": ("perfume", ["body mist", "body spray"]),
        },
        "Makeup": {
            "Lipstick": ("lipstick", ["lipstick", "lip colour"]),
            "Lip Gloss": ("lipstick", ["lip gloss", "lip tint"]),
        },
    },
    "Toys": {
        "Plush": {
            "Teddy Bears": ("plush", ["teddy bear", "teddy"]),
            "Plush Animals": ("plush", ["plush toy", "stuffed animal", "soft toy"]),
        },
    },
}

# Extra leaves when a config asks for more leaf categories than the tree has.
LEAF_VARIANTS = ["Kids", "Premium", "Vintage", "Sport", "Eco", "Mini", "Classic", "Outdoor"]

# name -> (RGB, synonyms used in titles and queries)
COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "black": ((25, 25, 28), ["black", "jet black"]),
    "white": ((236, 236, 230), ["white", "off-white", "ivory"]),
    "grey": ((128, 128, 132), ["grey", "gray", "charcoal"]),
    "red": ((200, 30, 40), ["red", "scarlet"]),
    "burgundy": ((110, 20, 45), ["burgundy", "wine red", "maroon"]),
    "pink": ((236, 120, 170), ["pink", "rose"]),
    "orange": ((240, 130, 30), ["orange", "tangerine"]),
    "yellow": ((240, 210, 40), ["yellow", "mustard"]),
    "beige": ((210, 185, 150), ["beige", "khaki", "camel"]),
    "brown": ((120, 75, 40), ["brown", "chocolate", "tan"]),
    "green": ((40, 150, 70), ["green", "emerald"]),
    "olive": ((110, 115, 45), ["olive", "army green"]),
    "navy": ((25, 40, 100), ["navy", "dark blue", "navy blue"]),
    "blue": ((40, 100, 210), ["blue", "royal blue", "cobalt"]),
    "sky blue": ((120, 185, 235), ["sky blue", "light blue", "baby blue"]),
    "purple": ((120, 60, 160), ["purple", "violet", "lilac"]),
}

# Attribute families: which attributes a leaf's items carry, and their values.
SHAPE_FAMILY = {
    **dict.fromkeys(["tshirt", "shirt", "dress", "skirt", "trousers", "shorts", "jacket", "sweater"], "apparel"),
    **dict.fromkeys(["sneaker", "boot", "heel", "sandal"], "shoes"),
    **dict.fromkeys(["handbag", "backpack", "wallet"], "bags"),
    **dict.fromkeys(["watch", "hat", "cap", "scarf", "sunglasses", "necklace"], "accessories"),
    **dict.fromkeys(["mug", "bottle", "lamp", "chair", "pillow", "plush"], "home"),
    **dict.fromkeys(["phone", "headphones", "laptop"], "electronics"),
    **dict.fromkeys(["perfume", "lipstick"], "beauty"),
}

ATTRIBUTES: dict[str, dict[str, list[str]]] = {
    "apparel": {
        "material": ["cotton", "linen", "polyester", "wool", "silk", "denim", "viscose"],
        "fit": ["slim fit", "regular fit", "loose", "oversized"],
        "season": ["summer", "winter", "all season", "spring"],
    },
    "shoes": {
        "material": ["leather", "canvas", "mesh", "suede", "rubber"],
        "closure": ["lace-up", "slip-on", "velcro", "buckle"],
        "season": ["summer", "winter", "all season"],
    },
    "bags": {
        "material": ["leather", "canvas", "nylon", "pu leather"],
        "closure": ["zip", "magnetic", "buckle", "drawstring"],
        "capacity": ["small", "medium", "large"],
    },
    "accessories": {
        "material": ["metal", "leather", "plastic", "straw", "cotton", "stainless steel"],
        "occasion": ["casual", "formal", "sports", "party"],
    },
    "home": {
        "material": ["ceramic", "glass", "stainless steel", "wood", "fabric", "plastic"],
        "room": ["kitchen", "living room", "bedroom", "office"],
    },
    "electronics": {
        "connectivity": ["wireless", "bluetooth", "wired", "5g", "wifi"],
        "storage": ["64gb", "128gb", "256gb", "512gb"],
    },
    "beauty": {
        "finish": ["matte", "glossy", "satin", "shimmer"],
        "volume": ["30ml", "50ml", "100ml"],
    },
}

SIZES = {
    "apparel": ["XS", "S", "M", "L", "XL", "XXL"],
    "shoes": ["36", "37", "38", "39", "40", "41", "42", "43", "44", "45"],
}

GENDER_WORDS = {"Women": ["women", "womens", "ladies"], "Men": ["men", "mens"]}

MARKETING_WORDS = [
    "new", "hot sale", "2026", "trendy", "premium", "free shipping", "limited edition",
    "best seller", "official", "genuine", "fashion", "high quality", "ins style",
]

BRAND_SYLLABLES = [
    "ka", "lo", "ve", "ra", "ni", "to", "su", "mi", "zen", "ar", "bel", "co", "da", "fi",
    "gor", "ha", "ix", "jo", "lu", "mar", "no", "or", "pa", "qui", "ro", "sa", "tel", "vi",
]

REGIONS = [
    "north", "south", "east", "west", "central", "coast", "highlands", "islands", "metro",
    "valley", "lakes", "plains", "delta", "desert", "forest", "harbour", "ridge", "bay",
    "steppe", "fjord", "mesa", "canyon", "prairie", "tundra", "savanna", "oasis",
]


def lexicon() -> dict[str, list[str]]:
    """The world's words that a catalogue's fields do not show: every colour with its synonyms
    and every leaf's product-noun synonyms, by entity type. The simulator records it in the
    items manifest, so that named-entity recognition knows the words its queries use."""
    colours = sorted({word for colour, (_, synonyms) in COLOURS.items() for word in (colour, *synonyms)})
    nouns = sorted({word for groups in CATEGORY_TREE.values() for leaves in groups.values()
                    for _, synonyms in leaves.values() for word in synonyms})
    return {"colour": colours, "category": nouns}
