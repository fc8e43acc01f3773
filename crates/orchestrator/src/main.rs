use std::process::ExitCode;

use berth_orchestrator::store::postgres::copy::copy_sqlite_to_postgres;

const STORE_COPY_USAGE: &str = "usage: berth-orchestrator store copy --from <SQLite file> --to <postgres://… URL>\n\
     copies an orchestrator's state from its SQLite file (store.path) into an empty PostgreSQL database (store.url)";

fn main() -> ExitCode {
    // `store copy` is a one-off job, not a service: it has its own
    // arguments and runs before (and instead of) the service's.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "store") {
        return store_command(&args[1..]);
    }
    berth_server::cli::service_main(
        "berth-orchestrator",
        "berth orchestrator: runs campaigns across the agents of many hosts \
         (`berth-orchestrator store copy --help`: move a SQLite store to PostgreSQL)",
        |config| async move { Ok(berth_orchestrator::start(config).await?) },
    )
}

/// `store copy --from <path> --to <url>`, the flags in either order.
fn store_command(args: &[String]) -> ExitCode {
    let (mut from, mut to) = (None, None);
    let mut rest = args.iter();
    let command = rest.next().map(String::as_str);
    while let Some(flag) = rest.next() {
        match (flag.as_str(), rest.next()) {
            ("--from", Some(value)) => from = Some(value),
            ("--to", Some(value)) => to = Some(value),
            _ => {
                from = None;
                break;
            }
        }
    }
    let (Some("copy"), Some(from), Some(to)) = (command, from, to) else {
        eprintln!("{STORE_COPY_USAGE}");
        return ExitCode::from(2);
    };
    match copy_sqlite_to_postgres(std::path::Path::new(from), to) {
        Ok(copied) => {
            for (table, rows) in copied {
                println!("{table}: {rows} rows copied");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("berth-orchestrator store copy: error: {error}");
            ExitCode::FAILURE
        }
    }
}
