//! `cargo run --release -p wschat-load --example load -- URL [options]`: the load client
//! on its own, the same as `wschat load URL [options]`.

use clap::Parser;

#[derive(Parser)]
#[command(about = "wschat load, latency and loss client")]
struct Cli {
    #[command(flatten)]
    args: wschat_load::LoadArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    wschat_load::run(cli.args).await?;
    Ok(())
}
