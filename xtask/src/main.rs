//! `cargo xtask`: project automation (`fetch-weights`: verified downloads of the pretrained weights).
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xtask::deeplab_weights::{self, WeightSpec};
use xtask::{fetch, FetchOptions};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project automation for the DeepLab workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List or download pretrained weights (hub backbones and official model-zoo checkpoints).
    ///
    /// Hub files go to the Hugging Face cache ($HF_HOME/hub, endpoint $HF_ENDPOINT); model-zoo
    /// archives go to --cache-dir, else $DEEPLAB_CACHE, else the user cache dir (~/.cache/deeplab),
    /// optionally from the mirror $DEEPLAB_ARCHIVE_MIRROR.
    FetchWeights {
        /// Print the table of available weights and exit.
        #[arg(long)]
        list: bool,
        /// With --list: also show model, preprocessing, metric protocol and checksum.
        #[arg(long, short, requires = "list")]
        verbose: bool,
        /// Fetch every entry of the table.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Project cache directory for model-zoo archives (overrides $DEEPLAB_CACHE).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Do not draw progress bars.
        #[arg(long)]
        no_progress: bool,
        /// Names from the table (see --list).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
}

/// Converts an extracted TensorFlow checkpoint into canonical safetensors with the heads
/// crate's converter (official variable names -> our key scheme, model config in the
/// metadata). The table entry supplies what the checkpoint cannot say: the output stride it
/// was trained at, the one to evaluate at, the ASPP rates and the multi-grid.
fn convert_checkpoint(ckpt: &Path, spec: &WeightSpec, out: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use deeplab_backbones::OutputStride;
    use deeplab_heads::convert::{convert_file, ConvertOptions};
    let os = |v: u32| OutputStride::try_from(v as usize).map_err(|e| anyhow::anyhow!("{e}"));
    let model = &spec.model;
    let train_os = model.train_output_stride.unwrap_or(16);
    let mut opts = ConvertOptions {
        output_stride: Some(os(train_os)?),
        eval_output_stride: Some(os(model.eval_output_stride)?),
        multi_grid: model
            .multi_grid
            .map(|m| m.iter().map(|&v| v as usize).collect()),
        ..Default::default()
    };
    if let Some(rates) = model
        .head
        .as_ref()
        .and_then(|h| h.atrous_rates_at(train_os))
    {
        opts.atrous_rates = Some(rates.iter().map(|&v| v as usize).collect());
    }
    let converted = convert_file(ckpt, out, &opts)
        .with_context(|| format!("converting `{}` from {}", spec.name, ckpt.display()))?;
    eprintln!(
        "converted {} variables ({} skipped) into {}",
        converted.mapping.len(),
        converted.skipped.len(),
        out.display()
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    let Command::FetchWeights {
        list,
        verbose,
        all,
        cache_dir,
        no_progress,
        names,
    } = cli.command;
    let mut opts = FetchOptions::from_env(cache_dir.as_deref())?;
    opts.progress = !no_progress;

    if list {
        print!(
            "{}",
            xtask::list::render(deeplab_weights::all(), Some(&opts.cache), verbose)
        );
        println!(
            "\nhub cache: {}\narchive cache: {}",
            opts.cache.hub.display(),
            opts.cache.archives.display()
        );
        return Ok(true);
    }

    let specs: Vec<&WeightSpec> = if all {
        deeplab_weights::all().iter().collect()
    } else if names.is_empty() {
        anyhow::bail!("name at least one entry, or pass --all or --list (see `cargo xtask fetch-weights --help`)");
    } else {
        names
            .iter()
            .map(|n| deeplab_weights::find(n))
            .collect::<Result<_, _>>()?
    };

    let mut ok = true;
    for spec in specs {
        match fetch(spec, &opts, &convert_checkpoint)
            .with_context(|| format!("fetching `{}` failed", spec.name))
        {
            Ok(f) => {
                for note in &f.notes {
                    eprintln!("note: {}: {note}", f.name);
                }
                let how = if f.from_cache { "cached" } else { "downloaded" };
                println!(
                    "{}: {} ({how}, sha256 {})",
                    f.name,
                    f.path.display(),
                    f.sha256
                );
            }
            Err(e) => {
                ok = false;
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(ok)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
