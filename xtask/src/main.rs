//! Developer chores: `cargo xtask <task>`.
//!
//! - `build-ptx [--check]`: compile `asynctls-kernels/cuda/*.cu` to the
//!   committed `asynctls-kernels/ptx/*.ptx` with nvcc from CUDA 13.0 (the
//!   GPU machines' driver cannot load PTX from newer toolkits). `--check`
//!   compiles into a temporary folder and fails when a committed file differs.
//! - `gpu-pack`: release GPU test binaries and a `run.sh` in `.gpu/`, for the
//!   GPU machine (`bash .gpu/run.sh` there).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

mod gpu_pack;
mod nvcc;

type Result<T> = std::result::Result<T, String>;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repo")
        .to_path_buf()
}

/// The `.cu` sources, sorted, and the PTX target of each.
fn cuda_sources(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    let dir = root.join("asynctls-kernels/cuda");
    let mut sources = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries {
            let path = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?.path();
            if path.extension().is_some_and(|e| e == "cu") {
                let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                // A kernel that needs wgmma/TMA says so on a line of its own.
                let arch = if text.lines().any(|l| l.trim() == "// arch: sm_90a") {
                    "sm_90a"
                } else {
                    "sm_90"
                };
                sources.push((path, arch.to_string()));
            }
        }
    }
    sources.sort();
    Ok(sources)
}

fn build_ptx(check: bool) -> Result<()> {
    let root = repo_root();
    let sources = cuda_sources(&root)?;
    let ptx_dir = root.join("asynctls-kernels/ptx");
    if sources.is_empty() {
        println!("build-ptx: no CUDA sources under asynctls-kernels/cuda; nothing to do");
        return Ok(());
    }
    let nvcc = nvcc::find_or_install(&root)?;
    let out_dir = if check {
        let d = root.join("target/xtask-ptx-check");
        std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
        d
    } else {
        std::fs::create_dir_all(&ptx_dir).map_err(|e| e.to_string())?;
        ptx_dir.clone()
    };
    let mut stale = Vec::new();
    for (src, arch) in &sources {
        let name = src.file_stem().expect("has a name").to_string_lossy().to_string();
        let out = out_dir.join(format!("{name}.ptx"));
        nvcc.compile(src, arch, &out)?;
        if check {
            let fresh = std::fs::read(&out).map_err(|e| e.to_string())?;
            let committed = std::fs::read(ptx_dir.join(format!("{name}.ptx"))).unwrap_or_default();
            if fresh != committed {
                stale.push(name);
            }
        } else {
            println!("build-ptx: {} -> {} ({arch})", src.display(), out.display());
        }
    }
    if !stale.is_empty() {
        return Err(format!(
            "committed PTX is stale for {}: run `cargo xtask build-ptx` and commit the result",
            stale.join(", ")
        ));
    }
    if check {
        println!("build-ptx --check: {} PTX files up to date", sources.len());
    }
    Ok(())
}

fn usage() -> String {
    "usage: cargo xtask build-ptx [--check] | gpu-pack".to_string()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["build-ptx"] => build_ptx(false),
        ["build-ptx", "--check"] => build_ptx(true),
        ["gpu-pack"] => gpu_pack::gpu_pack(&repo_root()),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command and turns a failure into a message with its output.
fn run(cmd: &mut Command) -> Result<()> {
    let output = cmd.output().map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
