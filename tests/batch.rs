//! Batched decode steps on a server: one real server holding every block (`0:30`, one
//! thread, `--metrics`), a bootstrap, and four `pollen generate` clients at once. The
//! server computes their concurrent decode steps in batches (its `/metrics` shows
//! batches of more than one step), and each client's text is the same as its `--local`
//! text: a batched step gives each session the bytes of its own step. The chat prompts
//! (over 32 tokens) are computed in parts: by rows in the fast mode, by blocks on an
//! exact-mode server, with the same text either way.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Tokens each client generates: enough for the four to overlap while decoding.
const TOKENS: usize = 32;

/// Runs `f` for every prompt, all at once, each on its own thread; the results in order.
fn all_at_once(f: impl Fn(&str, bool) -> String + Sync) -> Vec<String> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = PROMPTS
            .iter()
            .map(|&(prompt, chat)| s.spawn(move || f(prompt, chat)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A one-thread server of every block with `extra` arguments, batching by default and
/// serving its metrics: it, its metrics address and its ready line.
fn server(dir: &std::path::Path, addr: &str, extra: &[&str]) -> (Proc, String, String) {
    let mut cmd = Command::new(pollen());
    cmd.args(["serve", "--threads", "1", "--blocks", "0:30"])
        .args(extra)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--metrics", "127.0.0.1:0"])
        .args(["--no-mdns", "--bootstrap", addr])
        .arg("--model")
        .arg(model())
        .arg("--identity")
        .arg(dir.join("server.key"))
        .env_remove(pollen_node::serve::batch::MAX_BATCH_ENV);
    let server = Proc::spawn("server 0:30", &mut cmd).unwrap();
    let url = server
        .line_with("metrics ", Duration::from_secs(60))
        .unwrap()
        .trim_start_matches("metrics ")
        .to_string();
    let ready = server
        .line_with("ready", pollen_node::mesh::READY_TIMEOUT)
        .unwrap();
    (server, url, ready)
}

#[test]
fn concurrent_clients_are_batched_and_get_their_local_text() {
    let dir = temp_dir("batch");
    let (_boot, addr) = bootstrap(&dir, false);
    let (_server, url, ready) = server(&dir, &addr, &[]);
    // The ready line names the kernel the fast mode runs on (this machine's, as here).
    let kernel = format!("kernel {}", pollen_shard::kernels::active_path());
    assert!(
        ready.trim_end().ends_with(&kernel),
        "{ready:?} lacks {kernel:?}"
    );

    let local = all_at_once(|prompt, chat| generate(None, prompt, chat, TOKENS));
    let swarm = all_at_once(|prompt, chat| generate(Some(&addr), prompt, chat, TOKENS));
    for ((prompt, _), (l, s)) in PROMPTS.iter().zip(local.iter().zip(&swarm)) {
        assert!(!l.trim().is_empty(), "no local text for {prompt:?}");
        assert_eq!(s, l, "swarm text differs from local text for {prompt:?}");
    }

    let metrics = http_get_url(&url);
    let batches = metric_sample(&metrics, "pollen_batch_steps_count").unwrap();
    let steps = metric_sample(&metrics, "pollen_batch_steps_sum").unwrap();
    assert!(batches > 0.0, "no decode step went through the batch queue");
    // Every decode step after each client's first is computed in some batch; more
    // steps than batches means some batch held several sessions' steps.
    assert!(
        steps > batches,
        "{steps} decode steps in {batches} batches: none was batched with another"
    );
    let decoded =
        metric_sample(&metrics, "pollen_tokens_processed_total{phase=\"decode\"}").unwrap();
    assert_eq!(
        steps, decoded,
        "every decode step is counted once, batched or not"
    );
    // Each batch waited for the steps due soon at most its window, which is capped.
    let waits = metric_sample(&metrics, "pollen_batch_wait_seconds_count").unwrap();
    let waited = metric_sample(&metrics, "pollen_batch_wait_seconds_sum").unwrap();
    assert_eq!(waits, batches, "every batch's wait is counted once");
    let most = pollen_node::serve::batch::MOST_WAIT.as_secs_f64();
    assert!(
        waited <= batches * (most + 0.002),
        "{batches} batches waited {waited} s in all, more than {most} s each"
    );
    eprintln!("{steps} decode steps in {batches} batches, {waited:.4} s waiting for steps due");
    // The chat prompts (more than 32 tokens) were computed in parts of their rows.
    let parts = metric_sample(&metrics, "pollen_prompt_parts_total{by=\"rows\"}").unwrap();
    assert!(parts >= 4.0, "{parts} prompt parts for two long prompts");
}

/// An exact-mode server keeps candle's products, whose rows do not split with the same
/// bits, so it computes a long prompt a few blocks at a time instead (each part under
/// its own permit, other sessions' steps free to run between them): four clients at
/// once get their `--local` exact text, and the server's metrics count parts by blocks.
/// Its decode steps batch (candle computes the default model's Q4_1 products row by
/// row on the CPU, the same bits at any row count), with the same text.
#[test]
fn an_exact_server_computes_long_prompts_in_blocks_with_local_text() {
    let dir = temp_dir("batch-exact");
    let (_boot, addr) = bootstrap(&dir, false);
    let (_server, url, _) = server(
        &dir,
        &addr,
        &["--weights", "exact", "--prompt-part-ms", "1"],
    );
    let exact = ["--weights", "exact"];
    let tokens = 12;
    let local = all_at_once(|prompt, chat| generate_with(None, prompt, chat, tokens, &exact));
    let swarm =
        all_at_once(|prompt, chat| generate_with(Some(&addr), prompt, chat, tokens, &exact));
    for ((prompt, _), (l, s)) in PROMPTS.iter().zip(local.iter().zip(&swarm)) {
        assert!(!l.trim().is_empty(), "no local text for {prompt:?}");
        assert_eq!(
            s, l,
            "exact swarm text differs from local text for {prompt:?}"
        );
    }
    let metrics = http_get_url(&url);
    let blocks = metric_sample(&metrics, "pollen_prompt_parts_total{by=\"blocks\"}").unwrap();
    // Parts of about 1 ms: a block or so each, so many parts per long prompt.
    assert!(blocks >= 4.0, "{blocks} prompt parts for two long prompts");
    assert!(
        metric_sample(&metrics, "pollen_prompt_parts_total{by=\"rows\"}").is_none(),
        "an exact-mode server split a prompt's rows"
    );
    let batches = metric_sample(&metrics, "pollen_batch_steps_count").unwrap_or(0.0);
    let steps = metric_sample(&metrics, "pollen_batch_steps_sum").unwrap_or(0.0);
    eprintln!("exact mode: {steps} decode steps in {batches} batches");
    assert!(
        steps > batches && batches > 0.0,
        "{steps} exact-mode decode steps in {batches} batches: none was batched with another"
    );

    // A client that dies in the middle of a long prompt: the server stops at the next
    // part (one block here) and frees the session, instead of computing the 30 blocks
    // of a prompt nobody waits for.
    let parts =
        |text: &str| metric_sample(text, "pollen_prompt_parts_total{by=\"blocks\"}").unwrap_or(0.0);
    let open = |text: &str| metric_sample(text, "pollen_sessions_open{side=\"server\"}");
    let before = parts(&http_get_url(&url));
    let long = "Pollen runs open language models across volunteers' machines. ".repeat(30);
    let mut client = Command::new(pollen())
        .args(["generate", "--threads", "1", "--max-tokens", "1"])
        .args(["--weights", "exact", "--prompt", &long])
        .arg("--model")
        .arg(model())
        .args(["--no-mdns", "--bootstrap", &addr])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while parts(&http_get_url(&url)) < before + 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the long prompt never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    client.kill().unwrap();
    client.wait().unwrap();
    let killed = std::time::Instant::now();
    loop {
        let text = http_get_url(&url);
        if open(&text) == Some(0.0) {
            let done = parts(&text) - before;
            eprintln!(
                "a prompt whose client died: freed {:?} after, {done} of 30 blocks computed",
                killed.elapsed()
            );
            assert!(
                done < 25.0,
                "{done} blocks computed for a client that had died"
            );
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "the session of a dead client is still open: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
