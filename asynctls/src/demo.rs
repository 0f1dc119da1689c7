//! The needle-in-a-haystack task of `asynctls demo`: a long filler text with
//! one key-value sentence hidden at a random depth, and a question about it.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sentences of the haystack: plain, varied, and about nothing in particular,
/// so that only the needle answers the question.
const FILLER: &[&str] = &[
    "The morning train left the station a few minutes late, as it often did in winter.",
    "Gardeners say that tomatoes grow best when the soil is warm and the watering is regular.",
    "A small bakery on the corner sells bread that is still warm at seven o'clock.",
    "The river rose after three days of rain, but it never reached the old stone bridge.",
    "Most of the library's visitors come in the afternoon, after school lets out.",
    "Cyclists crowd the lakeside path on weekends when the weather is mild.",
    "The museum added a new wing for maps, some of them drawn by hand centuries ago.",
    "An old clock in the town hall chimes every quarter hour, though nobody winds it anymore.",
    "Farmers in the valley rotate their crops to keep the fields from wearing out.",
    "The committee met twice this month to discuss the budget for the new park.",
    "Snow fell early in the mountains, and the first skiers arrived a week later.",
    "The harbor is quiet at night except for the sound of ropes against the masts.",
    "A local choir practices on Thursdays in the hall behind the post office.",
    "The recipe calls for two cups of flour, one egg, and a pinch of salt.",
    "Birds gather on the telephone wires before they fly south in the autumn.",
    "The hiking trail climbs steadily through pine forest before it opens onto a ridge.",
    "Every spring the school holds a fair where students show their science projects.",
    "The bus route was changed last year so that it now passes the hospital.",
    "Painters like the light in the late afternoon, when the shadows grow long.",
    "The market opens at dawn, and the best apples are usually gone by nine.",
    "An engineer inspected the tunnel and found the walls in good condition.",
    "The village celebrates its founding each summer with music and long tables of food.",
    "Fog often covers the bay in the morning and burns off before noon.",
    "The new bookshop arranges its shelves by color rather than by author.",
    "A ferry crosses the strait four times a day, weather permitting.",
    "The old mill has been turned into a café with a view of the waterfall.",
    "Children in the neighborhood play football in the square until it gets dark.",
    "The observatory opens its telescope to the public on clear Friday nights.",
    "Workers repaved the main street in two weeks, ahead of the festival.",
    "The orchard produces pears, plums, and a few cherries in a good year.",
];

const CITIES: &[&str] = &[
    "Oslo", "Lisbon", "Kyoto", "Nairobi", "Lima", "Tallinn", "Hanoi", "Quito", "Dakar", "Perth", "Bergen", "Porto",
];

/// One task: the haystack with the needle, the question and the answer.
#[derive(Debug, Clone)]
pub struct Needle {
    pub city: String,
    pub number: String,
    pub document: String,
    pub question: String,
    /// Position of the needle in the document, as a fraction of its length.
    pub depth: f64,
}

impl Needle {
    /// Builds a task of about `words` words of filler; the needle and depth
    /// come from `seed`.
    pub fn generate(words: usize, seed: u64) -> Needle {
        let mut rng = StdRng::seed_from_u64(seed);
        let city = CITIES[rng.random_range(0..CITIES.len())].to_string();
        let number = rng.random_range(1_000_000..10_000_000u32).to_string();
        let depth_target: f64 = rng.random_range(0.15..0.85);
        let mut sentences = Vec::new();
        let mut count = 0;
        while count < words {
            let s = FILLER[rng.random_range(0..FILLER.len())];
            count += s.split_whitespace().count();
            sentences.push(s.to_string());
        }
        let at = ((sentences.len() as f64) * depth_target) as usize;
        sentences.insert(at, format!("The special magic number for {city} is {number}."));
        let depth = at as f64 / sentences.len() as f64;
        Needle {
            question: format!(
                "What is the special magic number for {city} mentioned in the text above? Answer with the number."
            ),
            document: sentences.join(" "),
            city,
            number,
            depth,
        }
    }

    /// The user turn: the document, then the question.
    pub fn prompt(&self) -> String {
        format!("{}\n\n{}", self.document, self.question)
    }

    /// Whether an answer contains the number.
    pub fn retrieved(&self, answer: &str) -> bool {
        answer
            .chars()
            .filter(|c| !c.is_whitespace() && *c != ',')
            .collect::<String>()
            .contains(&self.number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needle_is_in_the_document_once() {
        let n = Needle::generate(1500, 3);
        assert_eq!(n.document.matches(&n.number).count(), 1);
        assert!(n.question.contains(&n.city));
        assert!(n.document.split_whitespace().count() >= 1500);
        assert!(n.retrieved(&format!("The number is {}.", n.number)));
        assert!(!n.retrieved("I do not know."));
        assert_ne!(Needle::generate(100, 1).number, Needle::generate(100, 2).number);
    }
}
