//! `asynctls calibrate` end to end on the CPU: channels from calibration
//! text written in the checked file format, used by `generate
//! --label-channels` and loaded from a model directory; malformed files and
//! too-short texts are clear errors.

mod common;

use std::process::Command;

use asynctls_kvcache::KvDType;

fn asynctls(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_asynctls"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text_file(dir: &std::path::Path, words: usize) -> std::path::PathBuf {
    let vocab = [
        "river", "stone", "market", "lantern", "quiet", "northern", "copper", "harbor", "winter", "garden",
    ];
    let text: Vec<&str> = (0..words).map(|i| vocab[(i * 7 + i / 3) % vocab.len()]).collect();
    let path = dir.join(format!("calibration-{words}.txt"));
    std::fs::write(&path, text.join(" ")).unwrap();
    path
}

#[test]
fn calibrated_channels_are_written_checked_and_used() {
    let model_dir = common::tiny_chat_fixture("calibrate", None);
    let work = model_dir.parent().unwrap().to_path_buf();
    let text = text_file(&work, 600);
    let out = work.join("channels.json");
    let (m, t, o) = (
        model_dir.to_str().unwrap(),
        text.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let run = asynctls(&["calibrate", "--model", m, "--text", t, "--tokens", "200", "--out", o]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    // The file holds valid channels for this model's cache.
    let model = asynctls_models::load_model(&model_dir).unwrap();
    let config = model.cache_config(1, KvDType::F32);
    asynctls_models::read_label_channels(&out, &config).unwrap();
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(file["calibration"]["tokens"], 200);
    assert_eq!(file["channels"].as_array().unwrap().len(), config.num_layers);

    // generate with them, sparse.
    let gen = |channels: &str| {
        asynctls(&[
            "generate",
            "--model",
            m,
            "--prompt-ids",
            "5,6,7,8,9,10,11,12",
            "--max-new-tokens",
            "3",
            "--attention",
            "tls",
            "--dense-below",
            "0",
            "--device",
            "cpu",
            "--label-channels",
            channels,
        ])
    };
    let ok = gen(o);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    // A file for another model is refused, naming the file and the mismatch.
    let mut bad: serde_json::Value = file.clone();
    bad["channels"].as_array_mut().unwrap().pop();
    let bad_path = work.join("bad-channels.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let refused = gen(bad_path.to_str().unwrap());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("bad-channels.json") && err.contains("layers"), "{err}");

    // Too little text is a clear error, and nothing is written.
    let short = text_file(&work, 3);
    let none = work.join("none.json");
    let run = asynctls(&[
        "calibrate",
        "--model",
        m,
        "--text",
        short.to_str().unwrap(),
        "--out",
        none.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("fewer than"), "{:?}", run);
    assert!(!none.exists());
}

#[test]
fn a_model_directory_loads_its_calibrated_channels_and_refuses_bad_ones() {
    let model_dir = common::tiny_chat_fixture("calibrate-dir", None);
    let work = model_dir.parent().unwrap().to_path_buf();
    let text = text_file(&work, 400);
    // Without --out: into the model directory, where loading picks it up.
    let run = asynctls(&[
        "calibrate",
        "--model",
        model_dir.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--tokens",
        "200",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let own = model_dir.join(asynctls_models::LABEL_CHANNELS_FILE);
    assert!(own.is_file());
    asynctls_models::load_model(&model_dir).unwrap();
    // A broken one there fails the load, naming it.
    std::fs::write(&own, "{\"format\": \"asynctls-label-channels\"").unwrap();
    let err = asynctls_models::load_model(&model_dir).unwrap_err().to_string();
    assert!(err.contains("label_channels.json"), "{err}");
    std::fs::remove_file(&own).unwrap();
}
