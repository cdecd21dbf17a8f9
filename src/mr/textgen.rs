//! A deterministic generator of word-like English-looking text, so the tests and benchmarks
//! need no downloaded books. Word frequencies follow Zipf's law (the k-th most common word
//! appears about 1/k as often as the most common), as in real prose; frequent words are short.
//!
//! The same configuration always gives byte-identical files: the generator uses its own
//! SplitMix64 rather than a library RNG whose stream could change between versions.

use std::path::{Path, PathBuf};

use crate::mr::MrError;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenConfig {
    /// How many files.
    pub files: usize,
    /// Roughly how many bytes each file holds (each stops at the first line past this).
    pub bytes_per_file: usize,
    /// Distinct words in the shared vocabulary.
    pub vocabulary: usize,
    /// Seed; the same seed gives the same text.
    pub seed: u64,
}

impl Default for GenConfig {
    /// Eight files of 400 kB, about the 3.3 MB of the lab's eight books.
    fn default() -> GenConfig {
        GenConfig {
            files: 8,
            bytes_per_file: 400_000,
            vocabulary: 20_000,
            seed: 5840,
        }
    }
}

/// Named after the lab's books, so tests that pick out `sherlock` and `tom` (early exit) work
/// on generated input too.
const BOOK_NAMES: [&str; 8] = [
    "being_ernest",
    "dorian_gray",
    "frankenstein",
    "grimm",
    "huckleberry_finn",
    "metamorphosis",
    "sherlock_holmes",
    "tom_sawyer",
];

/// The file names [`write_corpus`] uses for `count` files: `pg-<book>.txt`, then
/// `pg-<book>-<n>.txt` past eight.
pub fn file_names(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let book = BOOK_NAMES[i % BOOK_NAMES.len()];
            match i / BOOK_NAMES.len() {
                0 => format!("pg-{book}.txt"),
                round => format!("pg-{book}-{round}.txt"),
            }
        })
        .collect()
}

/// Writes the corpus described by `config` into `dir` (which must exist) and returns the
/// paths, in order.
pub fn write_corpus(dir: &Path, config: &GenConfig) -> Result<Vec<PathBuf>, MrError> {
    let vocabulary = Vocabulary::new(config.seed, config.vocabulary.max(1));
    let mut paths = Vec::with_capacity(config.files);
    for (index, name) in file_names(config.files).into_iter().enumerate() {
        let seed = config.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let text = vocabulary.text(seed, config.bytes_per_file);
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| MrError::Write {
            path: path.clone(),
            source,
        })?;
        paths.push(path);
    }
    Ok(paths)
}

/// The text of one file of about `bytes` bytes, as [`write_corpus`] would write it with this
/// `seed` for the file and a vocabulary of `vocabulary` words drawn from `vocabulary_seed`.
pub fn generate_text(vocabulary_seed: u64, vocabulary: usize, seed: u64, bytes: usize) -> String {
    Vocabulary::new(vocabulary_seed, vocabulary.max(1)).text(seed, bytes)
}

/// SplitMix64 (Steele, Lea and Flood 2014): tiny, fast, and fixed forever.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high]`.
    fn between(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }
}

const ONSETS: &[&str] = &[
    "", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "th", "sh", "ch",
    "st", "br", "tr", "gr", "pl", "wh",
];
const NUCLEI: &[&str] = &["a", "e", "i", "o", "u", "ea", "ou", "ai", "ee", "oo"];
const CODAS: &[&str] = &["", "", "n", "r", "s", "t", "d", "l", "ng", "st", "nd", "ck"];

struct Vocabulary {
    /// Most frequent first.
    words: Vec<String>,
    /// `cumulative[k]` = P(rank <= k).
    cumulative: Vec<f64>,
}

impl Vocabulary {
    fn new(seed: u64, size: usize) -> Vocabulary {
        let mut rng = SplitMix64(seed);
        let mut seen = std::collections::HashSet::new();
        let mut words = Vec::with_capacity(size);
        while words.len() < size {
            // Mostly one to three syllables; longer words are rarer.
            let syllables = match rng.next_u64() % 10 {
                0..=2 => 1,
                3..=6 => 2,
                7..=8 => 3,
                _ => 4,
            };
            let mut word = String::new();
            for _ in 0..syllables {
                word.push_str(ONSETS[rng.between(0, ONSETS.len() - 1)]);
                word.push_str(NUCLEI[rng.between(0, NUCLEI.len() - 1)]);
                word.push_str(CODAS[rng.between(0, CODAS.len() - 1)]);
            }
            if seen.insert(word.clone()) {
                words.push(word);
            }
        }
        // Frequent words are short, as in real text (Zipf's law of abbreviation).
        words.sort_by_key(String::len);
        let weights: Vec<f64> = (1..=size).map(|rank| 1.0 / rank as f64).collect();
        let total: f64 = weights.iter().sum();
        let mut running = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                running += w / total;
                running
            })
            .collect();
        Vocabulary { words, cumulative }
    }

    fn word<'a>(&'a self, rng: &mut SplitMix64) -> &'a str {
        let u = rng.unit();
        let rank = self
            .cumulative
            .partition_point(|&c| c < u)
            .min(self.words.len() - 1);
        &self.words[rank]
    }

    fn text(&self, seed: u64, bytes: usize) -> String {
        const LINE_WIDTH: usize = 72;
        let mut rng = SplitMix64(seed);
        let mut text = String::with_capacity(bytes + LINE_WIDTH * 2);
        let mut line = String::new();
        let mut sentences_in_paragraph = 0;
        let paragraph_len = |rng: &mut SplitMix64| rng.between(3, 8);
        let mut paragraph_target = paragraph_len(&mut rng);
        while text.len() + line.len() < bytes {
            let length = rng.between(4, 20);
            for position in 0..length {
                let mut token = String::from(self.word(&mut rng));
                if position == 0 {
                    capitalize(&mut token);
                } else {
                    match rng.next_u64() % 100 {
                        0 => token = rng.between(1, 1900).to_string(),
                        1..=2 => token.push_str("'s"),
                        3 => capitalize(&mut token),
                        _ => {}
                    }
                }
                if position + 1 == length {
                    token.push(match rng.next_u64() % 10 {
                        0 => '?',
                        1 => '!',
                        _ => '.',
                    });
                } else if rng.next_u64().is_multiple_of(8) {
                    token.push(if rng.next_u64().is_multiple_of(5) {
                        ';'
                    } else {
                        ','
                    });
                }
                if !line.is_empty() && line.len() + 1 + token.len() > LINE_WIDTH {
                    text.push_str(&line);
                    text.push('\n');
                    line.clear();
                }
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(&token);
            }
            sentences_in_paragraph += 1;
            if sentences_in_paragraph == paragraph_target {
                text.push_str(&line);
                text.push_str("\n\n");
                line.clear();
                sentences_in_paragraph = 0;
                paragraph_target = paragraph_len(&mut rng);
            }
        }
        if !line.is_empty() {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

fn capitalize(word: &mut String) {
    if let Some(first) = word.get(..1) {
        let upper = first.to_ascii_uppercase();
        word.replace_range(..1, &upper);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_about_the_right_size() {
        let a = generate_text(1, 500, 7, 10_000);
        let b = generate_text(1, 500, 7, 10_000);
        assert_eq!(a, b);
        assert!(a.len() >= 10_000 && a.len() < 10_200, "{}", a.len());
        assert_ne!(a, generate_text(1, 500, 8, 10_000));
    }

    #[test]
    fn word_frequencies_are_skewed() {
        let text = generate_text(3, 5_000, 9, 200_000);
        let mut counts = std::collections::HashMap::new();
        for w in crate::mr::apps::words(&text) {
            *counts.entry(w.to_lowercase()).or_insert(0usize) += 1;
        }
        let mut freq: Vec<usize> = counts.values().copied().collect();
        freq.sort_unstable_by(|a, b| b.cmp(a));
        // Zipf: the top word is far more common than the hundredth.
        assert!(
            freq[0] > 30 * freq[99],
            "top {} vs 100th {}",
            freq[0],
            freq[99]
        );
        assert!(counts.len() > 1_000);
    }

    #[test]
    fn names_follow_the_books() {
        let names = file_names(10);
        assert_eq!(names[6], "pg-sherlock_holmes.txt");
        assert_eq!(names[8], "pg-being_ernest-1.txt");
    }
}
