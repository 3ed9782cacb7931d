//! Named steps: a section header before each, its outcome and time recorded,
//! and a summary at the end. A failed step does not stop the run; the exit
//! code says whether every step passed. With a step timeout (CI sets one),
//! a step that runs too long is killed, with everything it started, and
//! recorded as failed, so a hung test ends in a summary rather than in CI's
//! own time limit.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, ExitCode, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What became of one step.
#[derive(Debug)]
struct Record {
    name: String,
    failure: Option<String>,
    note: Option<String>,
    took: Duration,
}

/// The steps of one xtask run, in order.
#[derive(Debug, Default)]
pub struct Steps {
    records: Vec<Record>,
    timeout: Option<Duration>,
}

impl Steps {
    /// Steps that may each run for at most `timeout` (None: no limit).
    pub fn new(timeout: Option<Duration>) -> Self {
        Self {
            records: Vec::new(),
            timeout,
        }
    }

    /// Print a section header for a step that is about to start.
    pub fn header(&self, name: &str) {
        println!();
        println!("==> [xtask] {name}");
    }

    /// Run `cmd` as the step `name`, its output going straight through, with
    /// no standard input. Returns whether it succeeded.
    pub fn run(&mut self, name: &str, cmd: &mut Command) -> bool {
        self.header(name);
        println!("$ {}", display(cmd));
        let started = Instant::now();
        let failure = self.status(cmd).err();
        self.record(name, started.elapsed(), failure, None)
    }

    /// Run `cmd` with no standard input, within the step timeout; Ok if it
    /// succeeded, else why not. Output goes wherever `cmd` sends it.
    pub fn status(&self, cmd: &mut Command) -> Result<ExitStatus, String> {
        cmd.stdin(Stdio::null());
        let Some(timeout) = self.timeout else {
            return match cmd.status() {
                Ok(status) if status.success() => Ok(status),
                Ok(status) => Err(status.to_string()),
                Err(err) => Err(format!("could not start {}: {err}", program(cmd))),
            };
        };
        // Off a terminal (CI), its own process group, so that a timeout ends
        // the test binaries, QEMU and proxies it started too. On a terminal
        // it stays in ours, so Ctrl-C still reaches all of them.
        let own_group = !std::io::stdout().is_terminal();
        if own_group {
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .map_err(|err| format!("could not start {}: {err}", program(cmd)))?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(status),
                Ok(Some(status)) => return Err(status.to_string()),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
                Ok(None) => {
                    if own_group {
                        let group = format!("-{}", child.id());
                        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("timed out after {}; killed", seconds(timeout)));
                }
                Err(err) => return Err(format!("waiting for {}: {err}", program(cmd))),
            }
        }
    }

    /// Record the outcome of a step run some other way. Returns whether it passed.
    pub fn record(
        &mut self,
        name: &str,
        took: Duration,
        failure: Option<String>,
        note: Option<String>,
    ) -> bool {
        if let Some(why) = &failure {
            println!("xtask: step `{name}` FAILED: {why}");
        }
        let passed = failure.is_none();
        self.records.push(Record {
            name: name.to_owned(),
            failure,
            note,
            took,
        });
        passed
    }

    /// A step that could not go on at all (e.g. a missing tool that could not
    /// be installed): recorded as a failure, and nothing after it runs.
    pub fn abort(&mut self, err: &anyhow::Error) {
        println!();
        println!("xtask: stopping: {err:#}");
        self.records.push(Record {
            name: "stopped".to_owned(),
            failure: Some(format!("{err:#}")),
            note: None,
            took: Duration::ZERO,
        });
    }

    /// Print the summary; the exit code is nonzero if any step failed.
    pub fn finish(self) -> ExitCode {
        let width = self.records.iter().map(|r| r.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(out, "\n==> [xtask] summary");
        let mut total = Duration::ZERO;
        for r in &self.records {
            total += r.took;
            let verdict = if r.failure.is_some() { "FAILED" } else { "ok" };
            let _ = write!(
                out,
                "  {verdict:<6}  {:<width$}  {:>7}",
                r.name,
                seconds(r.took)
            );
            if let Some(note) = &r.note {
                let _ = write!(out, "  {note}");
            }
            if let Some(why) = &r.failure {
                let _ = write!(out, "  ({why})");
            }
            out.push('\n');
        }
        let failed: Vec<&str> = self
            .records
            .iter()
            .filter(|r| r.failure.is_some())
            .map(|r| r.name.as_str())
            .collect();
        let steps = self.records.len();
        if failed.is_empty() {
            let _ = writeln!(out, "xtask: all {steps} steps ok in {}", seconds(total));
        } else {
            let _ = writeln!(
                out,
                "xtask: {} of {steps} steps FAILED ({}) in {}",
                failed.len(),
                failed.join(", "),
                seconds(total)
            );
        }
        print!("{out}");
        if failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// A duration as whole or tenths of seconds, e.g. "12.3s".
pub fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The command line as a person would type it (program by its file name).
pub fn display(cmd: &Command) -> String {
    let mut line = program(cmd);
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        line.push(' ');
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            line.push_str(&format!("'{arg}'"));
        } else {
            line.push_str(&arg);
        }
    }
    line
}

fn program(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_commands_as_typed() {
        let mut cmd = Command::new("/usr/bin/cargo");
        cmd.args(["fmt", "--", "--check", "a b", ""]);
        assert_eq!(display(&cmd), "cargo fmt -- --check 'a b' ''");
    }

    #[test]
    fn a_failed_step_fails_the_run() {
        let mut steps = Steps::new(None);
        assert!(steps.run("true", &mut Command::new("true")));
        assert!(!steps.run("false", &mut Command::new("false")));
        assert_eq!(steps.finish(), ExitCode::FAILURE);
        let mut steps = Steps::new(None);
        assert!(steps.run("true", &mut Command::new("true")));
        assert_eq!(steps.finish(), ExitCode::SUCCESS);
    }

    #[test]
    fn a_step_past_its_timeout_is_killed() {
        let steps = Steps::new(Some(Duration::from_millis(300)));
        let started = Instant::now();
        let err = steps.status(Command::new("sleep").arg("30")).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
