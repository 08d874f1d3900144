//! `r3map migrate`: move a resource that an application keeps using to another host.

mod leech;
mod report;
mod seed;
mod transport;

use anyhow::Result;

/// Live-migrate a resource (a file, a disk, a program's memory) between hosts
///
/// On the source, `seed` serves the resource and the application keeps running on it. On the
/// destination, `leech` pulls it in the background; optional pre-copy rounds re-pull what the
/// source keeps writing; then finalize suspends the source, pulls the last dirty chunks first
/// and lets the destination's application in. The report gives the downtime: from the source's
/// suspend to the destination's gate opening.
///
///   source:       r3map migrate seed file:/var/tmp/vm.img --listen 127.0.0.1:1337 --pid 4242
///   destination:  r3map migrate leech grpc://SOURCE:1337 file:/var/tmp/vm.img --rounds 5
///   stuck source: r3map migrate abort grpc://SOURCE:1337   (resumes it)
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    Seed(seed::Args),
    Leech(leech::Args),
    Abort(AbortArgs),
}

/// Resume a source whose migration cannot finish (e.g. the destination vanished during
/// finalize); refused once the destination has taken over
#[derive(Debug, clap::Args)]
struct AbortArgs {
    /// The seeder, e.g. grpc://127.0.0.1:1337
    seeder: String,
    #[command(flatten)]
    link: transport::LinkArgs,
}

pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Seed(args) => seed::run(args).await,
        Command::Leech(args) => leech::run(args).await,
        Command::Abort(args) => {
            let before = transport::abort(&args.seeder, &args.link).await?;
            eprintln!("aborted the migration (the seeder was {before}); the source application runs again");
            Ok(())
        }
    }
}
