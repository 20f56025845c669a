//! Scheduler tests with a fake model: requests are (assembly steps, tokens to decode), a round
//! is one tick of a fake clock, and the fake "model" decodes one token per running request
//! per round.

use super::*;

const BPT: u64 = 100; // bytes per token

fn budgets(kv_tokens: u64, max_running: usize) -> Budgets {
    Budgets {
        step_tokens: 64,
        kv_bytes: kv_tokens * BPT,
        max_running,
        max_overtake: 2,
    }
}

/// A fake request: its reservation in tokens, assembly step costs, tokens to generate.
#[derive(Clone)]
struct Fake {
    id: ReqId,
    tokens: u64,
    steps: Vec<usize>,
    out: usize,
}

#[derive(Default)]
struct Log {
    /// Round each request was admitted and finished.
    admitted: Vec<(ReqId, usize)>,
    finished: Vec<(ReqId, usize)>,
    max_reserved: u64,
    max_step_tokens: usize,
}

/// Drives the scheduler as the worker does until every request ends (or `rounds` pass).
fn simulate(s: &mut Scheduler, reqs: &[Fake], rounds: usize) -> Log {
    let mut log = Log::default();
    for r in reqs {
        s.submit(r.id, r.tokens * BPT).expect("fits the budget");
    }
    let mut assembling: Vec<(Fake, usize)> = Vec::new();
    let mut decoding: Vec<(ReqId, usize)> = Vec::new();
    for round in 0..rounds {
        for id in s.admit() {
            log.admitted.push((id, round));
            let f = reqs.iter().find(|r| r.id == id).expect("known").clone();
            assembling.push((f, 0));
        }
        log.max_reserved = log.max_reserved.max(s.reserved());
        let costs: Vec<(ReqId, usize)> = assembling
            .iter()
            .map(|(f, k)| (f.id, f.steps[*k]))
            .collect();
        let chosen = s.plan(decoding.len(), &costs);
        let mut tokens = decoding.len();
        for (f, k) in assembling.iter_mut() {
            if chosen.contains(&f.id) {
                tokens += f.steps[*k];
                *k += 1;
            }
        }
        if chosen.len() > 1 {
            // More than one step only while they fit the budget together.
            log.max_step_tokens = log.max_step_tokens.max(tokens);
        }
        // The fake model decodes one token for every running sequence.
        for d in decoding.iter_mut() {
            d.1 -= 1;
        }
        for (id, _) in decoding.iter().filter(|d| d.1 == 0) {
            s.release(*id);
            log.finished.push((*id, round));
        }
        decoding.retain(|d| d.1 > 0);
        let (done, rest): (Vec<_>, Vec<_>) = assembling
            .into_iter()
            .partition(|(f, k)| *k == f.steps.len());
        assembling = rest;
        decoding.extend(done.into_iter().map(|(f, _)| (f.id, f.out)));
        if s.admitted() == 0 && s.waiting() == 0 {
            break;
        }
    }
    log
}

#[test]
fn kv_and_token_budgets_are_respected() {
    let mut s = Scheduler::new(budgets(1000, 16));
    let reqs: Vec<Fake> = (0..20)
        .map(|i| Fake {
            id: i,
            tokens: 300,
            steps: vec![1, 30, 30, 30, 8],
            out: 5,
        })
        .collect();
    let log = simulate(&mut s, &reqs, 1000);
    assert_eq!(log.finished.len(), 20, "every request ends");
    assert!(log.max_reserved <= 1000 * BPT, "{}", log.max_reserved);
    assert!(log.max_reserved >= 900 * BPT, "three fit at once");
    assert!(log.max_step_tokens <= 64, "{}", log.max_step_tokens);
    assert_eq!(s.reserved(), 0, "everything released");
}

#[test]
fn the_first_assembly_step_runs_even_over_the_token_budget() {
    let s = Scheduler::new(budgets(1000, 16));
    assert_eq!(s.plan(10, &[(1, 500), (2, 10), (3, 60)]), vec![1]);
    assert_eq!(s.plan(10, &[(1, 20), (2, 10), (3, 60)]), vec![1, 2]);
    assert_eq!(s.plan(0, &[]), Vec::<ReqId>::new());
}

#[test]
fn a_big_request_at_the_head_is_not_overtaken_forever() {
    let mut s = Scheduler::new(budgets(1000, 16));
    // Fill most of the budget, then a big request waits behind it while small ones arrive.
    let mut reqs = vec![Fake {
        id: 0,
        tokens: 600,
        steps: vec![1],
        out: 3,
    }];
    reqs.push(Fake {
        id: 1,
        tokens: 900,
        steps: vec![1],
        out: 3,
    });
    reqs.extend((2..40).map(|i| Fake {
        id: i,
        tokens: 100,
        steps: vec![1],
        out: 50,
    }));
    let log = simulate(&mut s, &reqs, 10_000);
    assert_eq!(log.finished.len(), 40);
    let big = log.admitted.iter().position(|(id, _)| *id == 1).unwrap();
    // Only the request before it and max_overtake (2) later ones are admitted first.
    let before: Vec<ReqId> = log.admitted[..big].iter().map(|a| a.0).collect();
    assert!(before.len() <= 1 + 2, "overtaken too often: {before:?}");
}

#[test]
fn strict_fifo_when_everything_fits() {
    let mut s = Scheduler::new(budgets(1000, 2));
    for i in 0..5 {
        s.submit(i, 10 * BPT).unwrap();
    }
    assert_eq!(s.admit(), vec![0, 1], "bounded by max_running");
    s.release(0);
    assert_eq!(s.admit(), vec![2]);
    s.release(3); // a waiting request that went away
    s.release(1);
    assert_eq!(s.admit(), vec![4]);
}

#[test]
fn a_request_over_the_whole_budget_is_refused() {
    let mut s = Scheduler::new(budgets(1000, 2));
    let e = s.submit(7, 1001 * BPT).unwrap_err();
    assert_eq!(
        e,
        KvRefusal {
            need: 100_100,
            budget: 100_000
        }
    );
    let m = e.message(900, 101);
    assert!(m.contains("--kv-budget") && m.contains("97.8 KiB") && m.contains("900 context"));
    assert_eq!(s.waiting(), 0);
    s.submit(8, 1000 * BPT).expect("exactly the budget fits");
}

/// A fake batched model: sequence `bad` fails whenever it is in the pass; a failed pass
/// leaves half-appended rows that rollback must undo.
struct FakeBatch {
    lens: Vec<usize>,
    before: Vec<usize>,
    bad: usize,
}

impl BatchStep for FakeBatch {
    type Out = usize;
    type Err = String;
    fn all(&mut self) -> Result<Vec<usize>, String> {
        for l in self.lens.iter_mut() {
            *l += 1; // the pass appends to every cache before failing
        }
        Err(format!("sequence {} ran out of memory", self.bad))
    }
    fn one(&mut self, i: usize) -> Result<usize, String> {
        self.lens[i] += 1;
        if i == self.bad {
            return Err("out of memory".into());
        }
        Ok(self.lens[i])
    }
    fn rollback(&mut self, i: usize) {
        self.lens[i] = self.before[i];
    }
}

#[test]
fn a_failing_sequence_does_not_fail_its_batch() {
    let mut b = FakeBatch {
        lens: vec![5, 7, 9],
        before: vec![5, 7, 9],
        bad: 1,
    };
    let r = decode_isolated(&mut b, 3);
    assert_eq!(r[0], Ok(6));
    assert!(r[1].is_err());
    assert_eq!(r[2], Ok(10));
    assert_eq!(b.lens, vec![6, 7, 10], "the failed one is rolled back");
}

#[test]
fn byte_sizes_parse_and_print() {
    assert_eq!(parse_bytes("20GiB").unwrap(), 20 << 30);
    assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
    assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
    assert_eq!(parse_bytes("4096").unwrap(), 4096);
    assert!(parse_bytes("12 parsecs")
        .unwrap_err()
        .contains("unknown unit"));
    assert!(parse_bytes("GiB").is_err() && parse_bytes("0").is_err());
    assert_eq!(human_bytes(300), "300 B");
    assert_eq!(human_bytes(3 << 29), "1.5 GiB");
}

#[test]
fn an_assembled_request_shrinks_its_reservation_and_lets_more_in() {
    // Budget for two full requests and a half; three wait.
    let mut s = Scheduler::new(budgets(250, 8));
    for id in 0..3 {
        s.submit(id, 100 * BPT).unwrap();
    }
    assert_eq!(s.admit(), vec![0, 1]);
    assert_eq!(s.reserved(), 200 * BPT);
    // Request 0 kept 15 rows of 100 (a sparse method): the third now fits.
    s.shrink(0, 15 * BPT);
    assert_eq!(s.reserved(), 115 * BPT);
    assert_eq!(s.admit(), vec![2]);
    // Never raised; unknown ids are ignored; release frees what is left.
    s.shrink(1, 500 * BPT);
    s.shrink(42, 0);
    assert_eq!(s.reserved(), 215 * BPT);
    s.release(0);
    assert_eq!(s.reserved(), 200 * BPT);
}
