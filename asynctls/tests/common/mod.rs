//! Test fixtures shared by the integration tests of this crate.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// GPT-2's byte-to-character map: a byte-level BPE writes byte `b` as this
/// character, so token id `b` is byte `b`.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut by_byte = vec!['?'; 256];
    for (b, c) in printable.iter().zip(chars) {
        by_byte[*b as usize] = char::from_u32(c).unwrap();
    }
    by_byte
}

/// Writes whole, then renames: tests of one binary run in parallel and may
/// build the same fixture at once.
fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp.{:?}", std::thread::current().id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A model directory `tiny-chat` under a temp folder named after `purpose`
/// and this process: the qwen3-tiny weights (vocabulary 256) with a
/// byte-level tokenizer over the same 256 ids and a chat template; its
/// positions raised to `max_positions` when given (RoPE has no learned
/// positions, and the weights are random anyway). Built once per process.
pub fn tiny_chat_fixture(purpose: &str, max_positions: Option<usize>) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../asynctls-models/tests/fixtures/qwen3-tiny");
    let dir = std::env::temp_dir()
        .join(format!("asynctls-{purpose}-{}", std::process::id()))
        .join("tiny-chat");
    // The tokenizer config is written last: its presence means complete.
    if dir.join("tokenizer_config.json").is_file() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    write_atomic(
        &dir.join("model.safetensors"),
        &std::fs::read(src.join("model.safetensors")).unwrap(),
    );
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    if let Some(n) = max_positions {
        config["max_position_embeddings"] = json!(n);
    }
    write_atomic(&dir.join("config.json"), config.to_string().as_bytes());
    let vocab: serde_json::Map<String, Value> = byte_chars()
        .iter()
        .enumerate()
        .map(|(id, c)| (c.to_string(), json!(id)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": []},
    });
    write_atomic(&dir.join("tokenizer.json"), tokenizer.to_string().as_bytes());
    let chat = json!({
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    });
    write_atomic(&dir.join("tokenizer_config.json"), chat.to_string().as_bytes());
    dir
}
