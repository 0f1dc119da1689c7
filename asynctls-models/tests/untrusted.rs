//! Model directories from strangers: hand-edited configs and shard indexes
//! are refused with an error naming the field, before anything is allocated
//! from them (each case here used to load, panic or abort).

use std::path::{Path, PathBuf};

use asynctls_models::{load_model, ModelError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A copy of fixture `name` in a fresh temporary directory.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("asynctls-untrusted-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn implausible_config_values_are_named() {
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "max_position_embeddings",
            serde_json::json!(1u64 << 31),
            "max_position_embeddings",
        ),
        ("rope_theta", serde_json::json!(0.0), "rope_theta"),
        ("rope_theta", serde_json::json!(-5.0), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(-1e-6), "rms_norm_eps"),
        (
            "num_attention_heads",
            serde_json::json!(1u64 << 40),
            "num_attention_heads",
        ),
        ("num_key_value_heads", serde_json::json!(0), "num_key_value_heads"),
        ("vocab_size", serde_json::json!(1u64 << 40), "vocab_size"),
    ];
    for (i, (field, value, named)) in cases.into_iter().enumerate() {
        for fixture in ["qwen3-tiny", "glm-tiny-plain"] {
            let dir = copy_of(fixture, &format!("cfg-{i}-{fixture}"));
            let original: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            // GLM's MLA has one latent head: its config's num_key_value_heads is unused.
            let unused = fixture.starts_with("glm") && field == "num_key_value_heads";
            if unused || original.get(field).is_none() && field != "rope_theta" {
                std::fs::remove_dir_all(&dir).unwrap();
                continue; // the family has no such field
            }
            edit_config(&dir, |v| {
                v[field] = value.clone();
                // Configs that keep rope_theta inside rope_parameters.
                if field == "rope_theta" {
                    if let Some(p) = v.get_mut("rope_parameters").and_then(|p| p.as_object_mut()) {
                        p.insert("rope_theta".into(), value.clone());
                    }
                }
            });
            let err = match load_model(&dir) {
                Ok(_) => panic!("{fixture} loaded with {field} = {value}"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(named), "{fixture} {field} = {value}: {err}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}

#[test]
fn a_config_with_fewer_layers_than_the_checkpoint_is_refused() {
    let dir = copy_of("qwen3-tiny", "layers");
    edit_config(&dir, |v| v["num_hidden_layers"] = serde_json::json!(1));
    let Err(err) = load_model(&dir) else {
        panic!("loaded with fewer layers")
    };
    assert!(matches!(err, ModelError::ExtraLayers { config: 1, .. }), "{err}");
    assert!(err.to_string().contains("model.layers.1."), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shards_outside_the_model_directory_are_refused() {
    let outside = std::env::temp_dir().join(format!("asynctls-untrusted-{}-outside.safetensors", std::process::id()));
    std::fs::copy(fixture("qwen3-tiny").join("model.safetensors"), &outside).unwrap();
    for (tag, shard) in [
        ("abs", outside.display().to_string()),
        (
            "dotdot",
            format!("../{}", outside.file_name().unwrap().to_string_lossy()),
        ),
    ] {
        let dir = copy_of("qwen3-tiny", &format!("shard-{tag}"));
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": shard } });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let Err(err) = load_model(&dir) else {
            panic!("{tag}: loaded")
        };
        let err = err.to_string();
        assert!(err.contains("inside the model directory"), "{tag}: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // A link inside the directory that leads out of it.
    #[cfg(unix)]
    {
        let dir = copy_of("qwen3-tiny", "shard-link");
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("linked.safetensors")).unwrap();
        let index = serde_json::json!({ "weight_map": { "model.embed_tokens.weight": "linked.safetensors" } });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let Err(err) = load_model(&dir) else {
            panic!("link: loaded")
        };
        let err = err.to_string();
        assert!(err.contains("outside the model directory"), "link: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::remove_file(&outside).unwrap();
}
