//! The `prefix-attn` command line (`src/cli/`).

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
