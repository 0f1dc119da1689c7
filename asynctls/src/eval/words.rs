//! Word lists of the generators: common English nouns and adjectives that
//! most BPE vocabularies hold as one or two tokens (RULER draws its keys and
//! words from the `wonderwords` lists; these are our own, shorter ones).

pub const ADJECTIVES: &[&str] = &[
    "able", "ancient", "angry", "bitter", "black", "blue", "bold", "brave", "bright", "broad", "busy", "calm",
    "careful", "cheap", "clean", "clever", "cold", "cool", "crazy", "curious", "damp", "dark", "deep", "dizzy", "dry",
    "dull", "eager", "early", "easy", "empty", "fair", "famous", "fancy", "fast", "fierce", "flat", "fresh",
    "friendly", "funny", "gentle", "giant", "glad", "golden", "good", "grand", "gray", "green", "happy", "hard",
    "heavy", "hidden", "hollow", "honest", "huge", "humble", "hungry", "icy", "jolly", "kind", "large", "lazy",
    "light", "little", "lively", "lonely", "long", "loud", "lucky", "mighty", "modern", "narrow", "neat", "nervous",
    "noisy", "odd", "old", "orange", "pale", "plain", "polite", "proud", "purple", "quick", "quiet", "rapid", "rare",
    "red", "rich", "rough", "round", "royal", "rusty", "sad", "safe", "salty", "sharp", "shiny", "short", "shy",
    "silent", "silly", "silver", "simple", "slow", "small", "smart", "smooth", "soft", "solid", "sour", "spicy",
    "steady", "steep", "sticky", "strange", "strong", "sweet", "swift", "tall", "tame", "tender", "thick", "thin",
    "tidy", "tiny", "tough", "true", "ugly", "vast", "warm", "weak", "wet", "white", "wide", "wild", "wise", "witty",
    "wooden", "yellow", "young", "zealous",
];

pub const NOUNS: &[&str] = &[
    "account", "actor", "airport", "anchor", "angle", "animal", "apple", "arch", "army", "artist", "baby", "badge",
    "bag", "ball", "band", "bank", "barn", "basket", "bath", "beach", "bean", "bear", "bed", "bee", "bell", "bench",
    "bird", "blade", "blanket", "boat", "body", "bone", "book", "boot", "bottle", "box", "branch", "bread", "brick",
    "bridge", "brush", "bucket", "button", "cabin", "cake", "camera", "camp", "candle", "canvas", "car", "card",
    "carpet", "castle", "cat", "cave", "chain", "chair", "chalk", "cheese", "cherry", "chest", "circle", "city",
    "cliff", "clock", "cloud", "coat", "coin", "comb", "cook", "copper", "cotton", "cow", "crab", "crown", "cup",
    "curtain", "cushion", "desk", "diamond", "dinner", "doctor", "dog", "door", "dragon", "drawer", "dress", "drum",
    "duck", "eagle", "egg", "engine", "farm", "feather", "fence", "field", "finger", "fish", "flag", "flower",
    "forest", "fork", "fox", "frog", "garden", "gate", "ghost", "glass", "glove", "goat", "guitar", "hammer", "harbor",
    "hat", "hill", "horse", "hospital", "house", "island", "jacket", "jewel", "kettle", "key", "king", "kitchen",
    "kite", "knife", "ladder", "lake", "lamp", "leaf", "lemon", "letter", "lion", "lizard", "lock", "machine", "map",
    "market", "mirror", "monkey", "moon", "mountain", "mouse", "nail", "needle", "nest", "net", "ocean", "office",
    "onion", "orchard", "owl", "oven", "paint", "palace", "paper", "parrot", "pencil", "piano", "pillow", "pipe",
    "planet", "plate", "pocket", "pond", "potato", "queen", "rabbit", "river", "road", "robot", "rock", "roof", "rope",
    "sail", "salad", "school", "scissors", "sheep", "shell", "ship", "shirt", "shoe", "shop", "silk", "snake", "sock",
    "spoon", "square", "stamp", "star", "station", "stone", "street", "sugar", "sword", "table", "teacher", "temple",
    "tent", "thread", "ticket", "tiger", "tomato", "tower", "toy", "train", "tree", "truck", "tunnel", "turtle",
    "umbrella", "valley", "village", "violin", "wagon", "wall", "watch", "whale", "wheel", "window", "wolf", "yard",
];
