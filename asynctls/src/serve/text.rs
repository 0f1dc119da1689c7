//! Generated token ids to streamed text: incremental detokenization and
//! stop strings.
//!
//! Decoding each new token alone is wrong for byte-level and SentencePiece
//! vocabularies (a character can span tokens, a leading space depends on
//! the token before), and decoding the whole generation every step is
//! quadratic. [`TextStream`] keeps a short window instead, as TGI and vLLM
//! do: the text of `ids[prefix..]` minus the text of `ids[prefix..read]` is
//! new, unless it ends in an incomplete character (U+FFFD), which waits for
//! the next token.
//!
//! Stop strings are matched on the text, across token boundaries: text
//! that could be the start of a stop string is held back until it is known
//! not to be one, and the stop string itself is never sent (OpenAI's rule).

/// Token ids to text (the model's tokenizer; a fake one in tests).
pub trait Detokenize {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String>;
}

impl Detokenize for asynctls_models::Tokenizer {
    fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
        self.decode(ids).map_err(|e| e.to_string())
    }
}

/// One sequence's text so far.
#[derive(Debug, Clone)]
pub struct TextStream {
    ids: Vec<u32>,
    /// `ids[prefix..read]` is the decoded context of the next delta.
    prefix: usize,
    read: usize,
    /// All text decoded so far, and how much of it was handed out.
    text: String,
    sent: usize,
    stops: Vec<String>,
    longest_stop: usize,
}

/// The text a token added that may be sent now, and whether a stop string
/// ended the generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    pub text: String,
    pub stopped: bool,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
        TextStream {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
            stops,
            longest_stop,
        }
    }

    /// Adds one generated token.
    pub fn push(&mut self, tok: &dyn Detokenize, id: u32) -> Result<Delta, String> {
        self.ids.push(id);
        let before = tok.detokenize(&self.ids[self.prefix..self.read])?;
        let now = tok.detokenize(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
        Ok(self.scan(false))
    }

    /// The end of the generation (token limit or stop token): whatever is
    /// still held back, an incomplete character included, goes out.
    pub fn finish(&mut self, tok: &dyn Detokenize) -> Result<Delta, String> {
        if self.read < self.ids.len() {
            let before = tok.detokenize(&self.ids[self.prefix..self.read])?;
            let now = tok.detokenize(&self.ids[self.prefix..])?;
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
            }
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(self.scan(true))
    }

    /// The whole text handed out so far.
    pub fn sent_text(&self) -> &str {
        &self.text[..self.sent]
    }

    fn scan(&mut self, at_end: bool) -> Delta {
        if !self.stops.is_empty() {
            // A stop string can start up to `longest - 1` bytes before the
            // new text; earlier starts were checked on earlier tokens.
            let mut from = self.sent.saturating_sub(self.longest_stop.saturating_sub(1));
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            let hit = self
                .stops
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| from + at))
                .min();
            if let Some(at) = hit {
                // Text before `sent` was checked not to contain a stop.
                let at = at.max(self.sent);
                let text = self.text[self.sent..at].to_string();
                self.text.truncate(at);
                self.sent = at;
                return Delta { text, stopped: true };
            }
        }
        let safe = if at_end {
            self.text.len()
        } else {
            self.text.len() - self.held_back()
        };
        let text = self.text[self.sent..safe].to_string();
        self.sent = safe;
        Delta { text, stopped: false }
    }

    /// Bytes at the end of the unsent text that begin some stop string
    /// (compared as bytes: a stop's prefix may end inside a character).
    fn held_back(&self) -> usize {
        let unsent = &self.text.as_bytes()[self.sent..];
        let mut hold = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            for k in (hold + 1)..stop.len().min(unsent.len() + 1) {
                if unsent.ends_with(&stop[..k]) && self.text.is_char_boundary(self.text.len() - k) {
                    hold = k;
                }
            }
        }
        hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each id is one byte of UTF-8; invalid sequences decode lossily, as a
    /// byte-level tokenizer does.
    struct Bytes;
    impl Detokenize for Bytes {
        fn detokenize(&self, ids: &[u32]) -> Result<String, String> {
            let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn run(text: &str, stops: &[&str]) -> (Vec<String>, String, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for b in text.bytes() {
            let d = s.push(&Bytes, b as u32).unwrap();
            deltas.push(d.text.clone());
            if d.stopped {
                return (deltas.clone(), deltas.concat(), true);
            }
        }
        let d = s.finish(&Bytes).unwrap();
        deltas.push(d.text);
        (deltas.clone(), deltas.concat(), false)
    }

    #[test]
    fn multibyte_characters_wait_for_their_last_byte() {
        let (deltas, all, stopped) = run("añb€", &[]);
        assert_eq!(all, "añb€");
        assert!(!stopped);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas[1], "");
        assert_eq!(deltas[2], "ñ");
    }

    #[test]
    fn stop_strings_cut_the_text_even_across_tokens() {
        let (deltas, all, stopped) = run("Hello, world. More", &["world"]);
        assert_eq!(all, "Hello, ");
        assert!(stopped);
        // "wor" was held back, never sent.
        assert!(deltas.iter().all(|d| !d.contains('w')), "{deltas:?}");
        // The earliest of several stops wins.
        assert_eq!(run("abcdef", &["de", "bc"]).1, "a");
        // A partial match that does not complete is released.
        let (_, all, stopped) = run("worm world", &["world"]);
        assert_eq!((all.as_str(), stopped), ("worm ", true));
        // No stop: everything, the held-back tail included, at the end.
        assert_eq!(
            run("say wor", &["world"]),
            (run("say wor", &["world"]).0, "say wor".into(), false)
        );
        // A stop at the very start sends nothing.
        assert_eq!(run("xyz", &["x"]).1, "");
    }
}
