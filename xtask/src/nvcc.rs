//! Finding nvcc 13.0, or installing it from the pinned PyPI wheels into a
//! virtual environment under `target/` when the machine has no CUDA.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{run, Result};

/// The wheels that together form a working nvcc 13.0 (cccl brings the
/// headers such as `cuda_fp16.h`).
const WHEELS: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];

pub struct Nvcc {
    path: PathBuf,
    include_dirs: Vec<PathBuf>,
}

impl Nvcc {
    pub fn compile(&self, src: &Path, arch: &str, out: &Path) -> Result<()> {
        let mut cmd = Command::new(&self.path);
        cmd.arg("--ptx")
            .arg(format!("-arch={arch}"))
            // No -lineinfo: it embeds absolute paths, and the committed PTX must
            // come out the same on every machine.
            .args(["-O3", "-std=c++17", "--use_fast_math"])
            .arg("-o")
            .arg(out)
            .arg(src);
        for dir in &self.include_dirs {
            cmd.arg("-I").arg(dir);
        }
        run(&mut cmd)
    }
}

fn version_ok(nvcc: &Path) -> bool {
    Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("release 13.0"))
        .unwrap_or(false)
}

pub fn find_or_install(root: &Path) -> Result<Nvcc> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(p.into());
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin/nvcc"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    if let Some(found) = candidates.into_iter().find(|p| p.is_file() && version_ok(p)) {
        return Ok(Nvcc {
            path: found,
            include_dirs: Vec::new(),
        });
    }
    install_wheels(root)
}

fn install_wheels(root: &Path) -> Result<Nvcc> {
    let venv = root.join("target/nvcc-13.0");
    let python = venv.join("bin/python");
    if !python.is_file() {
        eprintln!(
            "build-ptx: no nvcc 13.0 found; installing the pinned wheels into {}",
            venv.display()
        );
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let site = find_in_bin(&venv, "nvcc");
    if site.is_none() {
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(WHEELS))?;
    }
    let nvcc = find_in_bin(&venv, "nvcc")
        .ok_or_else(|| format!("the nvcc wheels installed into {} hold no nvcc binary", venv.display()))?;
    // The wheels keep headers in per-package include folders.
    let mut include_dirs = Vec::new();
    collect_include_dirs(&venv.join("lib"), &mut include_dirs);
    Ok(Nvcc {
        path: nvcc,
        include_dirs,
    })
}

/// A file called `name` in a `bin` folder anywhere under `dir`.
fn find_in_bin(dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_in_bin(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) && path.parent().is_some_and(|p| p.ends_with("bin")) {
            return Some(path);
        }
    }
    None
}

fn collect_include_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    entries.sort();
    for path in entries {
        if path.file_name().is_some_and(|n| n == "include") && path.to_string_lossy().contains("nvidia") {
            out.push(path);
        } else {
            collect_include_dirs(&path, out);
        }
    }
}
