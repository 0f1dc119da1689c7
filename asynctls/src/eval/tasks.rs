//! The task generators. Each builds its prompt from a number of haystack
//! units (filler sentences, distractor needles, list words) with the same
//! seeded draws for every unit count, so the answers do not depend on the
//! length, and [`generate`] searches the largest unit count whose prompt
//! fits the target length under the model's tokenizer (RULER grows the
//! haystack the same way until the prompt would not fit).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::words::{ADJECTIVES, NOUNS};
use super::{Essays, EvalError, TokenCounter};

/// RULER's "noise" haystack: one paragraph repeated.
pub const NOISE: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// A task of the suite. Names with a RULER counterpart are RULER's; the
/// `_noise` variants are RULER's multi-key, multi-value and multi-query
/// tasks on the noise haystack (RULER's own use the essay haystack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// One word key, one 7-digit number, noise haystack (RULER niah_single_1).
    NiahSingle1,
    /// Four keys in the haystack, one asked (RULER niah_multikey_1, on noise).
    NiahMultikeyNoise,
    /// The haystack is distractor needles; word keys, numbers (RULER niah_multikey_2).
    NiahMultikey2,
    /// The haystack is distractor needles; UUID keys and values (RULER niah_multikey_3).
    NiahMultikey3,
    /// One key with four values (RULER niah_multivalue, on noise).
    NiahMultivalueNoise,
    /// Four keys, all four asked (RULER niah_multiquery, on noise).
    NiahMultiqueryNoise,
    /// One chain of five variables, four hops (RULER vt).
    Vt,
    /// The ten words repeated 30 times among words repeated 3 times (RULER cwe).
    Cwe,
    /// The three most frequent coded words of a Zipf(2) text (RULER fwe).
    Fwe,
    /// One word key, one 7-digit number, essay haystack (RULER niah_single_2).
    NiahSingle2,
    /// One word key, one UUID, essay haystack (RULER niah_single_3).
    NiahSingle3,
}

impl Task {
    /// Every task; new ones go at the end (a task's position seeds its samples).
    pub const ALL: [Task; 11] = [
        Task::NiahSingle1,
        Task::NiahMultikeyNoise,
        Task::NiahMultikey2,
        Task::NiahMultikey3,
        Task::NiahMultivalueNoise,
        Task::NiahMultiqueryNoise,
        Task::Vt,
        Task::Cwe,
        Task::Fwe,
        Task::NiahSingle2,
        Task::NiahSingle3,
    ];

    /// Whether the task hides one needle (the tasks of the depth grid).
    pub fn single_needle(self) -> bool {
        matches!(self, Task::NiahSingle1 | Task::NiahSingle2 | Task::NiahSingle3)
    }

    /// Whether the task's haystack is the essays (`asynctls pull paul-graham-essays`).
    pub fn needs_essays(self) -> bool {
        matches!(self, Task::NiahSingle2 | Task::NiahSingle3)
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::NiahSingle1 => "niah_single_1",
            Task::NiahMultikeyNoise => "niah_multikey_noise",
            Task::NiahMultikey2 => "niah_multikey_2",
            Task::NiahMultikey3 => "niah_multikey_3",
            Task::NiahMultivalueNoise => "niah_multivalue_noise",
            Task::NiahMultiqueryNoise => "niah_multiquery_noise",
            Task::Vt => "vt",
            Task::Cwe => "cwe",
            Task::Fwe => "fwe",
            Task::NiahSingle2 => "niah_single_2",
            Task::NiahSingle3 => "niah_single_3",
        }
    }

    /// New tokens to generate: RULER's `tokens_to_generate` (128 for NIAH,
    /// 30 for vt, 120 for cwe, 50 for fwe), capped for a CPU run: enough
    /// for the answers of each task, restated once.
    pub fn max_new_tokens(self) -> usize {
        match self {
            Task::NiahSingle1 | Task::NiahMultikeyNoise | Task::NiahMultikey2 | Task::NiahSingle2 => 32,
            Task::NiahMultikey3 | Task::NiahSingle3 => 48,
            Task::NiahMultivalueNoise | Task::NiahMultiqueryNoise => 64,
            Task::Vt => 30,
            Task::Cwe => 64,
            Task::Fwe => 32,
        }
    }

    fn index(self) -> u64 {
        Task::ALL.iter().position(|&t| t == self).unwrap_or(0) as u64
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Task {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, EvalError> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| EvalError::UnknownTask(s.to_string()))
    }
}

/// One generated example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub task: Task,
    pub seed: u64,
    /// The user turn.
    pub input: String,
    /// Text the answer starts with, appended after the assistant prompt
    /// (RULER's `answer_prefix`), so the model continues with the answers.
    pub answer_prefix: String,
    /// Every string the output must contain.
    pub answers: Vec<String>,
    /// Tokens of input and prefix under the counter the sample was fitted by.
    pub tokens: usize,
    /// Haystack units of the fitted prompt.
    pub units: usize,
}

/// One build of a task at a unit count.
struct Built {
    input: String,
    answer_prefix: String,
    answers: Vec<String>,
}

/// The seed of sample `index` of `task` under the run seed `seed`: distinct
/// per task and sample, so tasks do not share needles.
pub fn sample_seed(seed: u64, task: Task, index: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(task.index().wrapping_mul(1_000_003))
        .wrapping_add(index as u64)
}

/// Sample `index` of `task`, its prompt (input and answer prefix) fitted to
/// at most `target_tokens` under `counter`, as long as the task's unit
/// supply allows.
pub fn generate(
    task: Task,
    seed: u64,
    index: usize,
    target_tokens: usize,
    counter: &dyn TokenCounter,
) -> Result<Sample, EvalError> {
    generate_with(task, seed, index, target_tokens, counter, None, None)
}

/// [`generate`] with the essay haystack (which the essay tasks need) and,
/// for the single-needle tasks, the needle at a fixed `depth` (0 = before
/// the first haystack sentence, 1 = after the last) instead of a seeded one:
/// the NIAH depth x length grid.
pub fn generate_with(
    task: Task,
    seed: u64,
    index: usize,
    target_tokens: usize,
    counter: &dyn TokenCounter,
    essays: Option<&Essays>,
    depth: Option<f64>,
) -> Result<Sample, EvalError> {
    if let Some(d) = depth {
        if !task.single_needle() || !(0.0..=1.0).contains(&d) {
            return Err(EvalError::Haystack(format!(
                "a needle depth of {d} for {task}: depths are 0 to 1, for niah_single_1, niah_single_2 and niah_single_3"
            )));
        }
    }
    let essays = match (task.needs_essays(), essays) {
        (true, None) => {
            return Err(EvalError::Haystack(format!(
                "{task} hides its needle in the Paul Graham essays: run `asynctls pull paul-graham-essays`"
            )))
        }
        (_, e) => e.map(Essays::sentences),
    };
    let seed = sample_seed(seed, task, index);
    let (min_units, max_units) = unit_range(task);
    let build = |units: usize| build(task, seed, units, essays.unwrap_or(&[]), depth);
    let count = |b: &Built| counter.count_tokens(&format!("{}{}", b.input, b.answer_prefix));
    let smallest = build(min_units);
    let needed = count(&smallest)?;
    if needed > target_tokens {
        return Err(EvalError::ContextTooShort {
            task: task.name(),
            needed,
            target: target_tokens,
        });
    }
    // Doubling, then bisection: `lo` always fits; `hi` does not (or is
    // past the supply).
    let (mut lo, mut lo_tokens) = (min_units, needed);
    let mut hi = None;
    let mut step = min_units.max(1);
    while hi.is_none() && lo < max_units {
        let probe = (lo + step).min(max_units);
        let tokens = count(&build(probe))?;
        if tokens <= target_tokens {
            (lo, lo_tokens) = (probe, tokens);
            step *= 2;
        } else {
            hi = Some(probe);
        }
    }
    if let Some(mut hi) = hi {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let tokens = count(&build(mid))?;
            if tokens <= target_tokens {
                (lo, lo_tokens) = (mid, tokens);
            } else {
                hi = mid;
            }
        }
    }
    let b = build(lo);
    Ok(Sample {
        task,
        seed,
        input: b.input,
        answer_prefix: b.answer_prefix,
        answers: b.answers,
        tokens: lo_tokens,
        units: lo,
    })
}

/// The fewest and the most haystack units a task can be built from.
fn unit_range(task: Task) -> (usize, usize) {
    match task {
        // NIAH: filler sentences or distractor needles; vt: noise paragraphs.
        Task::Vt => (1, 1 << 20),
        // cwe: the distinct words of the list (ten of them the common ones).
        Task::Cwe => (CWE_COMMON + 1, ADJECTIVES.len() + NOUNS.len()),
        // fwe: words of the coded text before the Zipf counts are floored.
        Task::Fwe => (16, 1 << 22),
        _ => (1, 1 << 20),
    }
}

fn build(task: Task, seed: u64, units: usize, essays: &[String], depth: Option<f64>) -> Built {
    use Haystack::{Needles, Noise};
    use Kind::{Numbers, Uuids, Words};
    let mut rng = StdRng::seed_from_u64(seed);
    // The single-needle tasks may take a fixed depth (the grid); the others
    // place their needles at seeded positions.
    let single = |rng: &mut StdRng, haystack, value| niah(rng, units, haystack, Words, value, 1, 1, 1, depth);
    let multi = |rng: &mut StdRng, haystack, key, value, k, v, q| niah(rng, units, haystack, key, value, k, v, q, None);
    match task {
        Task::NiahSingle2 => single(&mut rng, Haystack::Essays(essays), Numbers),
        Task::NiahSingle3 => single(&mut rng, Haystack::Essays(essays), Uuids),
        Task::NiahSingle1 => single(&mut rng, Noise, Numbers),
        Task::NiahMultikeyNoise => multi(&mut rng, Noise, Words, Numbers, 4, 1, 1),
        Task::NiahMultikey2 => multi(&mut rng, Needles, Words, Numbers, 1, 1, 1),
        Task::NiahMultikey3 => multi(&mut rng, Needles, Uuids, Uuids, 1, 1, 1),
        Task::NiahMultivalueNoise => multi(&mut rng, Noise, Words, Numbers, 1, 4, 1),
        Task::NiahMultiqueryNoise => multi(&mut rng, Noise, Words, Numbers, 4, 1, 4),
        Task::Vt => variable_tracking(&mut rng, units),
        Task::Cwe => common_words(&mut rng, units),
        Task::Fwe => frequent_words(&mut rng, units),
    }
}

#[derive(Debug, Clone, Copy)]
enum Haystack<'a> {
    Noise,
    /// Needles of other keys (RULER's `needle` haystack).
    Needles,
    /// The essays' sentences in order, from the first (again from the
    /// first when more are asked for than there are).
    Essays(&'a [String]),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Words,
    Numbers,
    Uuids,
}

impl Kind {
    /// RULER's `type_needle_v` as the templates print it.
    fn plural(self) -> &'static str {
        match self {
            Kind::Words => "words",
            Kind::Numbers => "numbers",
            Kind::Uuids => "uuids",
        }
    }

    fn draw(self, rng: &mut StdRng) -> String {
        match self {
            Kind::Words => format!(
                "{}-{}",
                ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
                NOUNS[rng.random_range(0..NOUNS.len())]
            ),
            Kind::Numbers => rng.random_range(1_000_000..10_000_000u32).to_string(),
            Kind::Uuids => uuid4(rng),
        }
    }
}

/// A version-4 UUID from `rng`, in the usual 8-4-4-4-12 form.
fn uuid4(rng: &mut StdRng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn needle_sentence(value_kind: Kind, key: &str, value: &str) -> String {
    format!(
        "One of the special magic {} for {key} is: {value}.",
        value_kind.plural()
    )
}

/// RULER's `niah`: `num_k` keys with `num_v` values each hidden among
/// `units` haystack sentences at random positions, `num_q` of the keys
/// asked; the answers are every value of the asked keys.
#[allow(clippy::too_many_arguments)]
fn niah(
    rng: &mut StdRng,
    units: usize,
    haystack: Haystack<'_>,
    key_kind: Kind,
    value_kind: Kind,
    num_k: usize,
    num_v: usize,
    num_q: usize,
    depth: Option<f64>,
) -> Built {
    let mut keys: Vec<String> = Vec::with_capacity(num_k);
    while keys.len() < num_k {
        let k = key_kind.draw(rng);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let values: Vec<Vec<String>> = keys
        .iter()
        .map(|_| (0..num_v).map(|_| value_kind.draw(rng)).collect())
        .collect();
    let mut needles: Vec<String> = keys
        .iter()
        .zip(&values)
        .flat_map(|(k, vs)| vs.iter().map(move |v| needle_sentence(value_kind, k, v)))
        .collect();
    needles.shuffle(rng);
    let mut asked: Vec<usize> = rand::seq::index::sample(rng, num_k, num_q).into_vec();
    asked.sort_unstable();
    // The haystack draws come after the needles', and from their own
    // stream, so a longer haystack keeps the same needles.
    let mut hay_rng = StdRng::seed_from_u64(rng.random());
    let mut sentences: Vec<String> = match haystack {
        Haystack::Noise => vec![NOISE.to_string(); units],
        Haystack::Needles => (0..units)
            .map(|_| loop {
                let k = key_kind.draw(&mut hay_rng);
                if !keys.contains(&k) {
                    break needle_sentence(value_kind, &k, &value_kind.draw(&mut hay_rng));
                }
            })
            .collect(),
        Haystack::Essays(essays) => (0..units).map(|i| essays[i % essays.len().max(1)].clone()).collect(),
    };
    // RULER: positions drawn without replacement, inserted from the back;
    // at a fixed depth for the grid (one needle).
    let mut at: Vec<usize> = match depth {
        Some(d) => vec![(d * units as f64).round() as usize],
        None => rand::seq::index::sample(&mut hay_rng, units.max(needles.len()), needles.len()).into_vec(),
    };
    at.sort_unstable_by(|a, b| b.cmp(a));
    for (pos, needle) in at.into_iter().zip(needles) {
        sentences.insert(pos.min(sentences.len()), needle);
    }
    let asked_keys: Vec<&str> = asked.iter().map(|&i| keys[i].as_str()).collect();
    let query = match asked_keys.as_slice() {
        [one] => one.to_string(),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
        [] => String::new(),
    };
    let v = value_kind.plural();
    // Essay sentences run on as prose; the other haystacks are one per line.
    let joiner = if matches!(haystack, Haystack::Essays(_)) {
        " "
    } else {
        "\n"
    };
    Built {
        input: format!(
            "Some special magic {v} are hidden within the following text. Make sure to memorize it. I will quiz you about the {v} afterwards.\n{}\nWhat are all the special magic {v} for {query} mentioned in the provided text?",
            sentences.join(joiner)
        ),
        answer_prefix: format!(" The special magic {v} for {query} mentioned in the provided text are"),
        answers: asked.iter().flat_map(|&i| values[i].clone()).collect(),
    }
}

/// RULER's `variable_tracking`, one chain of four hops: `VAR A = 12345`,
/// `VAR B = VAR A`, ... hidden in order among `units` noise paragraphs;
/// the answers are the five variable names.
fn variable_tracking(rng: &mut StdRng, units: usize) -> Built {
    const HOPS: usize = 4;
    let mut vars: Vec<String> = Vec::with_capacity(HOPS + 1);
    while vars.len() < HOPS + 1 {
        let v: String = (0..5).map(|_| char::from(b'A' + rng.random_range(0..26u8))).collect();
        if !vars.contains(&v) {
            vars.push(v);
        }
    }
    let value = rng.random_range(10_000..99_999u32).to_string();
    let mut chain = vec![format!("VAR {} = {value}", vars[0])];
    chain.extend((0..HOPS).map(|j| format!("VAR {} = VAR {}", vars[j + 1], vars[j])));
    let mut hay_rng = StdRng::seed_from_u64(rng.random());
    let mut sentences = vec![NOISE.to_string(); units];
    // RULER: sorted positions, each shifted by the statements already in,
    // so the chain keeps its order.
    let mut at: Vec<usize> = rand::seq::index::sample(&mut hay_rng, units.max(chain.len()), chain.len()).into_vec();
    at.sort_unstable();
    for (j, (pos, statement)) in at.into_iter().zip(chain).enumerate() {
        sentences.insert((pos + j).min(sentences.len()), statement);
    }
    Built {
        input: format!(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{}\nQuestion: Find all variables that are assigned the value {value} in the text above.",
            sentences.join("\n")
        ),
        // "assgined" is RULER's spelling.
        answer_prefix: format!(
            " Answer: According to the chain(s) of variable assignment in the text above, {} variables are assgined the value {value}, they are: ",
            HOPS + 1
        ),
        answers: vars,
    }
}

const CWE_COMMON: usize = 10;

/// RULER's `common_words_extraction`: `units` distinct words, the first ten
/// repeated 30 times and the rest 3 times, shuffled into a numbered list;
/// the answers are the ten common words.
fn common_words(rng: &mut StdRng, units: usize) -> Built {
    let mut pool: Vec<&str> = ADJECTIVES.iter().chain(NOUNS).copied().collect();
    pool.shuffle(rng);
    let words = &pool[..units.min(pool.len())];
    let (common, uncommon) = words.split_at(CWE_COMMON.min(words.len()));
    let mut list: Vec<&str> = Vec::with_capacity(common.len() * 30 + uncommon.len() * 3);
    for _ in 0..30 {
        list.extend_from_slice(common);
    }
    for _ in 0..3 {
        list.extend_from_slice(uncommon);
    }
    list.shuffle(rng);
    let context: Vec<String> = list
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect();
    Built {
        input: format!(
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{}\nQuestion: What are the 10 most common words in the above list?",
            context.join(" ")
        ),
        answer_prefix: " Answer: The top 10 words that appear most often in the list are:".to_string(),
        answers: common.iter().map(|w| w.to_string()).collect(),
    }
}

/// RULER's `freq_words_extraction` (alpha 2, six-letter coded words, a
/// vocabulary of 2,000): word of rank k appears floor(n k^-2 / zeta(2))
/// times, rank 1 is the noise `...`; the answers are ranks 2 to 4.
fn frequent_words(rng: &mut StdRng, units: usize) -> Built {
    const VOCAB: usize = 2000;
    let mut vocab: Vec<String> = Vec::with_capacity(VOCAB);
    let mut seen = std::collections::HashSet::with_capacity(VOCAB);
    while vocab.len() < VOCAB {
        let w: String = (0..6).map(|_| char::from(b'a' + rng.random_range(0..26u8))).collect();
        if seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    vocab[0] = "...".to_string();
    let zeta2 = std::f64::consts::PI * std::f64::consts::PI / 6.0;
    let mut text: Vec<&str> = Vec::new();
    for (k, w) in vocab.iter().enumerate() {
        let count = (units as f64 * ((k + 1) as f64).powi(-2) / zeta2) as usize;
        if count == 0 {
            break;
        }
        text.extend(std::iter::repeat_n(w.as_str(), count));
    }
    let mut shuffle_rng = StdRng::seed_from_u64(rng.random());
    text.shuffle(&mut shuffle_rng);
    Built {
        input: format!(
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
            text.join(" ")
        ),
        answer_prefix: " Answer: According to the coded text above, the three most frequently appeared words are:".to_string(),
        answers: vocab[1..4].to_vec(),
    }
}
