//! Ctrl-C and SIGTERM: the first stops a role politely, the second exits at once.

use tokio_util::sync::CancellationToken;

/// Cancels `stop` on the first Ctrl-C or SIGTERM; on the second, cancels
/// `kill` and exits the process with status 130.
pub fn watch(stop: CancellationToken, kill: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        for n in 0..2 {
            #[cfg(unix)]
            let what = {
                let term_recv = async {
                    match term.as_mut() {
                        Some(t) => {
                            t.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => "Ctrl-C",
                    _ = term_recv => "SIGTERM",
                }
            };
            #[cfg(not(unix))]
            let what = {
                let _ = tokio::signal::ctrl_c().await;
                "Ctrl-C"
            };
            if n == 0 {
                stop.cancel();
                // Not `eprintln!`, which panics where stderr is gone (a closed pipe):
                // this task would die with it and no second signal would ever stop us.
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "stopping on {what} (a second {what} exits at once)"
                );
            } else {
                kill.cancel();
                std::process::exit(130);
            }
        }
    });
}
