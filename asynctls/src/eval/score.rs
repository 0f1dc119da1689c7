//! RULER's scoring: `string_match_all`.

/// The fraction of `answers` that appear in `output`, case-insensitively, as
/// substrings (RULER's per-sample score for every task but QA). No answers
/// scores 0: a sample without a reference cannot be passed.
pub fn sample_recall(output: &str, answers: &[String]) -> f64 {
    if answers.is_empty() {
        return 0.0;
    }
    let output = output.to_lowercase();
    let found = answers.iter().filter(|a| output.contains(&a.to_lowercase())).count();
    found as f64 / answers.len() as f64
}

/// The task score in percent: the mean of [`sample_recall`] over the
/// samples, as RULER reports it (0 to 100). `outputs[i]` answers
/// `answers[i]`; extra entries of the longer list are ignored.
pub fn string_match_all(outputs: &[String], answers: &[Vec<String>]) -> f64 {
    let n = outputs.len().min(answers.len());
    if n == 0 {
        return 0.0;
    }
    let total: f64 = outputs.iter().zip(answers).map(|(o, a)| sample_recall(o, a)).sum();
    100.0 * total / n as f64
}
