//! The `deeplab` command line: parses the arguments and runs the command; every failure is one
//! line on stderr (`error: ...` naming the file or flag) and a non-zero exit status.

use clap::Parser;

#[global_allocator]
static GLOBAL: deeplab_cli::alloc::Allocator = deeplab_cli::alloc::Allocator {};

fn main() {
    deeplab_cli::alloc::configure();
    let cli = match deeplab_cli::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || matches!(
                    e.kind(),
                    ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                )
            {
                let _ = e.print();
                std::process::exit(if e.use_stderr() { 2 } else { 0 });
            }
            // clap's message is several lines (usage, tips): keep the first, which names the flag
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("error: invalid arguments");
            eprintln!("{first} (see `deeplab --help`)");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

fn run(cli: deeplab_cli::cli::Cli) -> anyhow::Result<()> {
    deeplab_cli::cli::run(cli)
}
