//! The eval suite: the task generators against the RULER definitions on
//! fixed seeds, the scoring, the length fitting, and `asynctls eval` end to
//! end on the tiny random-weight fixture model (a byte-level tokenizer, so
//! one byte is one token).

use std::path::PathBuf;
use std::process::Command;

use asynctls::eval::{
    generate, generate_with, parse_tasks, sample_recall, string_match_all, Essays, Sample, Task, NOISE,
};
use serde_json::Value;

mod common;

/// A counter of one token per byte: the fixture's tokenizer, and exact.
fn bytes(text: &str) -> usize {
    text.len()
}

/// A stand-in for the pulled essays (the tests never need the real ones):
/// sentences run together as in the essay files.
fn essays() -> Essays {
    let text = (0..400)
        .map(|i| format!("Essay sentence {i} talks about startups and cities.Another thought {i} follows it! "))
        .collect::<String>();
    Essays::from_text(&text).unwrap()
}

fn sample(task: Task, seed: u64, target: usize) -> Sample {
    generate_with(task, seed, 0, target, &bytes, Some(&essays()), None).unwrap()
}

/// The context lines of a NIAH prompt, between the instruction line and the question.
fn niah_context(input: &str) -> Vec<&str> {
    let lines: Vec<&str> = input.lines().collect();
    lines[1..lines.len() - 1].to_vec()
}

#[test]
fn niah_single_1_is_rulers_template_around_noise_and_one_needle() {
    let s = sample(Task::NiahSingle1, 7, 3000);
    assert_eq!(s.answers.len(), 1);
    let value = &s.answers[0];
    assert!(value.len() == 7 && value.chars().all(|c| c.is_ascii_digit()), "{value}");
    let lines = niah_context(&s.input);
    let needles: Vec<&&str> = lines.iter().filter(|l| **l != NOISE).collect();
    assert_eq!(needles.len(), 1, "one needle among the noise");
    // "One of the special magic numbers for {key} is: {value}." with a
    // RULER word key (adjective-noun).
    let needle = needles[0];
    let key = needle
        .strip_prefix("One of the special magic numbers for ")
        .and_then(|r| r.strip_suffix(&format!(" is: {value}.")))
        .unwrap_or_else(|| panic!("needle {needle}"));
    assert_eq!(key.split('-').count(), 2, "{key}");
    let expected = format!(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\n{}\nWhat are all the special magic numbers for {key} mentioned in the provided text?",
        lines.join("\n")
    );
    assert_eq!(s.input, expected);
    assert_eq!(
        s.answer_prefix,
        format!(" The special magic numbers for {key} mentioned in the provided text are")
    );
    assert_eq!(lines.len(), s.units + 1);
}

#[test]
fn fixed_seed_golden_answers() {
    // Written out once from the generators at seed 0; a change here means
    // every stored result was made on other prompts.
    let golden: Vec<(Task, Vec<&str>)> = vec![
        (Task::NiahSingle1, vec!["5997599"]),
        (Task::NiahMultikeyNoise, vec!["4249185"]),
        (Task::NiahMultikey2, vec!["3395636"]),
        (Task::NiahMultikey3, vec!["1730be5b-9492-4e96-81a9-cbb0c34a4559"]),
        (
            Task::NiahMultivalueNoise,
            vec!["9504915", "4667388", "5790879", "6668093"],
        ),
        (
            Task::NiahMultiqueryNoise,
            vec!["5977416", "8216088", "2075462", "7293650"],
        ),
        (Task::Vt, vec!["GMWKC", "ZHRNA", "SXZTK", "XAJMJ", "BUUVV"]),
        (
            Task::Cwe,
            vec![
                "rabbit", "white", "salty", "steady", "station", "smart", "artist", "orange", "green", "bed",
            ],
        ),
        (Task::Fwe, vec!["fhqqko", "tfksfh", "hwyjxx"]),
    ];
    for (task, answers) in golden {
        assert_eq!(sample(task, 0, 4000).answers, answers, "{task}");
    }
}

#[test]
fn multikey_noise_hides_four_keys_and_asks_one() {
    let s = sample(Task::NiahMultikeyNoise, 3, 4000);
    let needles: Vec<&str> = niah_context(&s.input).into_iter().filter(|l| *l != NOISE).collect();
    assert_eq!(needles.len(), 4);
    assert_eq!(s.answers.len(), 1);
    let asked = needles
        .iter()
        .find(|n| n.ends_with(&format!(" is: {}.", s.answers[0])))
        .unwrap();
    let key = asked
        .strip_prefix("One of the special magic numbers for ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert!(s.input.ends_with(&format!("for {key} mentioned in the provided text?")));
}

#[test]
fn multivalue_and_multiquery_answers_are_every_asked_value() {
    let mv = sample(Task::NiahMultivalueNoise, 5, 4000);
    assert_eq!(mv.answers.len(), 4);
    let key_of = |needle: &str| {
        needle
            .split(" for ")
            .nth(1)
            .unwrap()
            .split(" is: ")
            .next()
            .unwrap()
            .to_string()
    };
    let needles: Vec<String> = niah_context(&mv.input)
        .into_iter()
        .filter(|l| *l != NOISE)
        .map(String::from)
        .collect();
    assert_eq!(needles.len(), 4);
    assert!(
        needles.iter().all(|n| key_of(n) == key_of(&needles[0])),
        "one key, four values"
    );
    for v in &mv.answers {
        assert_eq!(mv.input.matches(v.as_str()).count(), 1);
    }

    let mq = sample(Task::NiahMultiqueryNoise, 5, 4000);
    assert_eq!(mq.answers.len(), 4);
    // RULER's query list: "a, b, c, and d".
    let question = mq.input.lines().last().unwrap();
    assert_eq!(question.matches(", ").count(), 3, "{question}");
    assert!(question.contains(", and "), "{question}");
}

#[test]
fn needle_haystacks_are_distractor_needles() {
    let s = sample(Task::NiahMultikey2, 11, 3000);
    let lines = niah_context(&s.input);
    assert!(lines
        .iter()
        .all(|l| l.starts_with("One of the special magic numbers for ")));
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.ends_with(&format!(" is: {}.", s.answers[0])))
            .count(),
        1
    );

    let u = sample(Task::NiahMultikey3, 11, 3000);
    let uuid = &u.answers[0];
    assert_eq!(uuid.len(), 36);
    assert_eq!(uuid.split('-').map(str::len).collect::<Vec<_>>(), vec![8, 4, 4, 4, 12]);
    assert_eq!(&uuid[14..15], "4", "version 4");
    assert!(u.input.contains("special magic uuids for "));
    assert_eq!(u.input.matches(uuid.as_str()).count(), 1);
}

#[test]
fn variable_tracking_chain_is_in_order() {
    let s = sample(Task::Vt, 2, 3000);
    assert_eq!(s.answers.len(), 5);
    let value = s
        .input
        .split("assigned the value ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let first = s
        .input
        .find(&format!("VAR {} = {value}\n", s.answers[0]))
        .expect("the chain's head");
    let mut at = first;
    for w in s.answers.windows(2) {
        let next = s.input.find(&format!("VAR {} = VAR {}\n", w[1], w[0])).expect("a hop");
        assert!(next > at, "hops in order");
        at = next;
    }
    assert!(s.answer_prefix.contains("5 variables are assgined the value"));
}

#[test]
fn common_words_repeat_thirty_times_and_the_rest_three() {
    let s = sample(Task::Cwe, 4, 6000);
    assert_eq!(s.answers.len(), 10);
    let list = s.input.lines().nth(1).unwrap();
    let words: Vec<&str> = list.split(' ').collect::<Vec<_>>().chunks(2).map(|c| c[1]).collect();
    for a in &s.answers {
        assert_eq!(words.iter().filter(|w| *w == a).count(), 30, "{a}");
    }
    let others = words.iter().filter(|w| !s.answers.iter().any(|a| a == *w));
    let mut counts = std::collections::HashMap::new();
    for w in others {
        *counts.entry(*w).or_insert(0) += 1;
    }
    assert!(!counts.is_empty() && counts.values().all(|&c| c == 3));
    assert!(list.starts_with("1. "));
}

#[test]
fn frequent_words_answers_are_ranks_two_to_four() {
    let s = sample(Task::Fwe, 9, 6000);
    assert_eq!(s.answers.len(), 3);
    let text = s.input.split("coded words. ").nth(1).unwrap().lines().next().unwrap();
    let count = |w: &str| text.split(' ').filter(|x| *x == w).count();
    let (dots, a, b, c) = (
        count("..."),
        count(&s.answers[0]),
        count(&s.answers[1]),
        count(&s.answers[2]),
    );
    assert!(dots > a && a > b && b > c && c > 0, "{dots} {a} {b} {c}");
    // floor(n k^-2 / zeta(2)): rank 2 appears a quarter as often as rank 1.
    assert!((dots as f64 / a as f64 - 4.0).abs() < 0.2, "{dots} {a}");
}

#[test]
fn prompts_fit_the_target_length() {
    for task in Task::ALL {
        for target in [4000, 8000] {
            let s = sample(task, 1, target);
            let tokens = bytes(&format!("{}{}", s.input, s.answer_prefix));
            assert_eq!(tokens, s.tokens, "{task}");
            assert!(tokens <= target, "{task}: {tokens} > {target}");
            assert!(tokens as f64 >= 0.9 * target as f64, "{task}: {tokens} of {target}");
        }
    }
    let err = generate(Task::NiahSingle1, 0, 0, 50, &bytes).unwrap_err();
    assert!(err.to_string().contains("needs at least"), "{err}");
}

#[test]
fn generators_are_deterministic_and_vary_by_sample() {
    let essays = essays();
    let generate = |task, seed, index, target| generate_with(task, seed, index, target, &bytes, Some(&essays), None);
    for task in Task::ALL {
        let a = generate(task, 42, 0, 5000).unwrap();
        assert_eq!(a, generate(task, 42, 0, 5000).unwrap(), "{task}");
        let b = generate(task, 42, 1, 5000).unwrap();
        assert_ne!(a.answers, b.answers, "{task}");
        // The answers do not depend on the length the prompt is fitted to.
        assert_eq!(a.answers, generate(task, 42, 0, 7000).unwrap().answers, "{task}");
    }
}

#[test]
fn the_essay_tasks_hide_one_needle_in_the_essays_in_order() {
    let essays = essays();
    for (task, value_is_uuid) in [(Task::NiahSingle2, false), (Task::NiahSingle3, true)] {
        let s = generate_with(task, 7, 0, 3000, &bytes, Some(&essays), None).unwrap();
        assert_eq!(s.answers.len(), 1, "{task}");
        let value = &s.answers[0];
        assert_eq!(
            value.len() == 36 && value.matches('-').count() == 4,
            value_is_uuid,
            "{task}: {value}"
        );
        let kind = if value_is_uuid { "uuids" } else { "numbers" };
        let needle = format!("One of the special magic {kind} for ");
        assert_eq!(s.input.matches(&needle).count(), 1, "{task}");
        assert!(s.input.contains(&format!("is: {value}.")), "{task}");
        // The haystack is the essays from their first sentence, as prose.
        let body = s.input.lines().nth(1).unwrap();
        assert!(
            body.starts_with(&essays.sentences()[0]) || body.starts_with("One of"),
            "{task}: {body:.80}"
        );
        assert!(body.contains(&format!("{} {}", essays.sentences()[1], essays.sentences()[2])) || s.units < 3);
        assert!(s.answer_prefix.contains(kind), "{task}");
    }
    // Without the essays the tasks say how to get them.
    let err = generate(Task::NiahSingle2, 0, 0, 3000, &bytes).unwrap_err().to_string();
    assert!(err.contains("asynctls pull paul-graham-essays"), "{err}");
    // The splitter breaks run-on sentences of the essay files.
    let split = Essays::from_text("July 2010What hard liquor is.It was  fine?\nYes! end").unwrap();
    assert_eq!(
        split.sentences(),
        ["July 2010What hard liquor is.", "It was fine?", "Yes!", "end"]
    );
    assert!(Essays::from_text("  \n ").is_err());
}

#[test]
fn the_depth_grid_places_the_needle_at_its_depth() {
    let essays = essays();
    for task in [Task::NiahSingle1, Task::NiahSingle2] {
        let mut positions = Vec::new();
        for depth in [0.0, 0.5, 1.0] {
            let s = generate_with(task, 3, 0, 4000, &bytes, Some(&essays), Some(depth)).unwrap();
            let at = s.input.find("One of the special magic").unwrap();
            positions.push(at as f64 / s.input.len() as f64);
            // The same needle at every depth.
            assert_eq!(
                s.answers,
                generate_with(task, 3, 0, 4000, &bytes, Some(&essays), Some(0.0))
                    .unwrap()
                    .answers
            );
        }
        assert!(
            positions[0] < 0.1 && (positions[1] - 0.5).abs() < 0.1 && positions[2] > 0.9,
            "{task}: {positions:?}"
        );
    }
    // Only one-needle tasks, depths 0 to 1.
    assert!(generate_with(Task::NiahMultikey2, 3, 0, 4000, &bytes, None, Some(0.5)).is_err());
    assert!(generate_with(Task::NiahSingle1, 3, 0, 4000, &bytes, None, Some(1.5)).is_err());
}

#[test]
fn scoring_is_rulers_string_match_all() {
    let refs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        sample_recall("The numbers are 123 and 456.", &refs(&["123", "456", "789"])),
        2.0 / 3.0
    );
    assert_eq!(sample_recall("ANSWER: Apple, PEAR", &refs(&["apple", "pear"])), 1.0);
    assert_eq!(sample_recall("nothing here", &refs(&["apple"])), 0.0);
    assert_eq!(sample_recall("anything", &[]), 0.0);
    // Substrings count, as in RULER: "12345" is found in "123456".
    assert_eq!(sample_recall("123456", &refs(&["12345"])), 1.0);
    let outputs = vec!["a b".to_string(), "c".to_string()];
    let answers = vec![refs(&["a", "b"]), refs(&["c", "d"])];
    assert!((string_match_all(&outputs, &answers) - 75.0).abs() < 1e-9);
    assert_eq!(string_match_all(&[], &[]), 0.0);
}

#[test]
fn task_lists_parse() {
    assert_eq!(parse_tasks("all").unwrap().len(), Task::ALL.len());
    assert_eq!(parse_tasks("vt,cwe,vt").unwrap(), vec![Task::Vt, Task::Cwe]);
    let err = parse_tasks("vt,nope").unwrap_err().to_string();
    assert!(
        err.contains("unknown eval task `nope`") && err.contains("niah_single_1"),
        "{err}"
    );
}

/// The tiny fixture with its positions raised to 2,048: the test is of the
/// pipeline, not of the scores.
fn fixture_dir() -> PathBuf {
    common::tiny_chat_fixture("eval", Some(2048))
}

fn asynctls(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_asynctls"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn eval_end_to_end_on_the_tiny_model_resumes_from_its_result_file() {
    let dir = fixture_dir();
    let out = dir.parent().unwrap().join("rows.jsonl");
    let _ = std::fs::remove_file(&out);
    let args = [
        "eval",
        "niah_single_1,vt",
        "--model",
        dir.to_str().unwrap(),
        "--ctx",
        "1024",
        "--policies",
        "dense,tls,quest",
        "--budgets",
        "128",
        "--block-topk",
        "2",
        "--samples",
        "2",
        "--max-new-tokens",
        "8",
        "--dense-layers",
        "0",
        "--device",
        "cpu",
        "--measure-attention",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    let first = asynctls(&args);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(rows.len(), 2 * 3, "two tasks x (dense, tls 128, quest 128)");
    for r in &rows {
        let score = r["score"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&score));
        assert_eq!(r["outputs"].as_array().unwrap().len(), 2);
        let tokens = r["prompt_tokens"].as_f64().unwrap();
        assert!(tokens <= 1024.0 - 8.0 && tokens > 900.0, "{tokens}");
        if r["policy"] == "dense" {
            assert_eq!(r["sparse_layers"], 0);
        } else {
            // Proof that the sparse path ran: both layers sparse, and well
            // under the whole context attended (128 tokens or 2 blocks of
            // 64, with the sink and the local window, of about 1,000).
            assert_eq!(r["sparse_layers"], 2);
            let f = r["attended_fraction"].as_f64().expect("measured");
            assert!(f > 0.0 && f < 0.6, "{}: {f}", r["policy"]);
        }
    }
    let tls = rows.iter().find(|r| r["policy"] == "tls").unwrap();
    assert_eq!(tls["block_topk"], 2);
    // 2 blocks of candidates (128 tokens) and k_t 128: only the block stage cuts.
    assert_eq!(tls["stages"], "block");
    assert_eq!(rows.iter().find(|r| r["policy"] == "quest").unwrap()["stages"], "block");
    assert_eq!(tls["budget"], 128);
    let lines = std::fs::read_to_string(&out).unwrap().lines().count();
    assert_eq!(lines, 6);
    // A rerun finds every row and appends none.
    let again = asynctls(&args);
    assert!(again.status.success());
    let rows_again: Vec<Value> = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(rows_again, rows);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 6);
}

#[test]
fn eval_rejects_bad_flags_with_a_message() {
    let dir = fixture_dir();
    let model = dir.to_str().unwrap();
    for (args, says) in [
        (vec!["eval", "nope", "--model", model], "unknown eval task `nope`"),
        (
            vec!["eval", "vt", "--model", model, "--samples", "0"],
            "--samples must be positive",
        ),
        (
            vec!["eval", "vt", "--model", model, "--budgets", "0"],
            "positive token budgets",
        ),
        (
            vec!["eval", "vt", "--model", model, "--ctx", "100000", "--device", "cpu"],
            "longer than the model's context",
        ),
        (
            vec!["eval", "vt", "--model", model, "--ctx", "40", "--device", "cpu"],
            "needs at least",
        ),
        (
            vec!["eval", "vt", "--model", model, "--policies", "sparse"],
            "unknown attention policy",
        ),
    ] {
        let out = asynctls(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
