//! Calibrated label channels on disk: `label_channels.json` in a model
//! directory (loaded with the model) or any file given by a flag. The file
//! is untrusted input: its size, its layer and head counts, the channels per
//! head and every channel index are checked against the model's cache
//! before it is used.

use std::path::Path;

use asynctls_kvcache::{CacheConfig, LabelChannels};
use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::{ModelError, Result};

/// The file a model directory's calibrated channels live in.
pub const LABEL_CHANNELS_FILE: &str = "label_channels.json";
const FORMAT: &str = "asynctls-label-channels";
/// Far above any real model's (layers x KV heads x r x a few bytes).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// The file's contents: `channels[layer][kv_head]` holds `r` sorted indices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelsFile {
    pub format: String,
    pub version: u32,
    pub r: usize,
    pub channels: Vec<Vec<Vec<u16>>>,
    /// How they were chosen (tokens of calibration text, its file), for people.
    #[serde(default)]
    pub calibration: serde_json::Value,
}

impl ChannelsFile {
    pub fn new(channels: &LabelChannels, config: &CacheConfig, calibration: serde_json::Value) -> Self {
        ChannelsFile {
            format: FORMAT.into(),
            version: 1,
            r: config.label_channels,
            channels: (0..config.num_layers)
                .map(|l| (0..config.kv_heads).map(|h| channels.get(l, h).to_vec()).collect())
                .collect(),
            calibration,
        }
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        // Written beside and renamed, so a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| io_err(&tmp, "cannot write label channels", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, "cannot write label channels", e))
    }
}

/// Reads calibrated label channels from `path` for a cache of `config`.
pub fn read_label_channels(path: &Path, config: &CacheConfig) -> Result<LabelChannels> {
    let bad = |what: String| ModelError::Config {
        path: path.to_path_buf(),
        what,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| io_err(path, "cannot read label channels", e))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(bad(format!(
            "{size} bytes is not a label-channel file (at most {MAX_FILE_BYTES})"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, "cannot read label channels", e))?;
    let file: ChannelsFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if file.format != FORMAT || file.version != 1 {
        return Err(bad(format!(
            "format `{}` version {} (expected `{FORMAT}` version 1)",
            file.format, file.version
        )));
    }
    if file.r != config.label_channels {
        return Err(bad(format!(
            "{} channels per head, the cache keeps {}",
            file.r, config.label_channels
        )));
    }
    if file.channels.len() != config.num_layers {
        return Err(bad(format!(
            "{} layers of channels for a model of {}",
            file.channels.len(),
            config.num_layers
        )));
    }
    for (l, layer) in file.channels.iter().enumerate() {
        if layer.len() != config.kv_heads {
            return Err(bad(format!(
                "layer {l} has {} KV heads of channels, the model {}",
                layer.len(),
                config.kv_heads
            )));
        }
        for (h, head) in layer.iter().enumerate() {
            let sorted_unique = head.windows(2).all(|w| w[0] < w[1]);
            if head.len() != file.r || !sorted_unique || head.iter().any(|&c| c as usize >= config.key_dim) {
                return Err(bad(format!(
                    "layer {l} head {h}: channels must be {} distinct sorted indices below the key dim {}",
                    file.r, config.key_dim
                )));
            }
        }
    }
    Ok(LabelChannels::new(file.channels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_bad_file_is_named() {
        let config = CacheConfig {
            label_channels: 4,
            ..CacheConfig::gqa(2, 2, 16, 8)
        };
        let dir = std::env::temp_dir().join(format!("asynctls-channels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(LABEL_CHANNELS_FILE);
        let channels = LabelChannels::new(vec![vec![vec![1, 3, 5, 15], vec![0, 2, 4, 6]]; 2]);
        ChannelsFile::new(&channels, &config, serde_json::json!({"tokens": 10}))
            .write(&path)
            .unwrap();
        assert_eq!(read_label_channels(&path, &config).unwrap(), channels);
        let other = CacheConfig {
            label_channels: 4,
            ..CacheConfig::gqa(3, 2, 16, 8)
        };
        assert!(read_label_channels(&path, &other)
            .unwrap_err()
            .to_string()
            .contains("2 layers"));
        let text = std::fs::read_to_string(&path).unwrap();
        for (from, to, says) in [
            ("15", "16", "below the key dim"),
            ("\"r\":4", "\"r\":3", "channels per head"),
            ("asynctls-label-channels", "other", "format"),
            ("]]]", "]]", ""),
        ] {
            std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
            let err = read_label_channels(&path, &config).unwrap_err().to_string();
            assert!(err.contains(says), "{from} -> {to}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
