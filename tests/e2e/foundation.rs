//! Issue 2: tracing the user functions of C, C++ and Rust programs.

use omegi_tests::{
    fixtures::{self, Linking},
    run::{self, Agent},
    spans::traces,
};

fn agent() -> Agent {
    Agent::new(env!("CARGO_BIN_EXE_omegi-agent"))
}

#[test]
fn c_calls_exact_traces_pie_and_nopie() {
    for linking in [Linking::Pie, Linking::NoPie] {
        let exe = fixtures::build("c/calls.c", linking);
        let traced = agent().trace(&exe, &[] as &[&str], &[]);
        let plain = run::untraced(&exe, &[] as &[&str]);
        assert_eq!(traced.status.code(), Some(3), "{}", traced.stderr);
        assert_eq!(traced.status.code(), plain.status.code());
        assert_eq!(traced.stdout.as_bytes(), plain.stdout.as_slice());

        let traces = traces(&traced.spans);
        let shapes: Vec<String> = traces.iter().map(|t| t.shape()).collect();
        assert_eq!(
            shapes,
            vec![
                "main(compute(leaf fib(fib(fib fib) fib)))",
                "worker(compute(leaf leaf fib(fib(fib fib) fib)))",
            ],
            "{linking:?}"
        );
        for trace in &traces {
            trace.check_well_formed();
        }
        assert_ne!(traces[0].root().tid(), traces[1].root().tid());
    }
}
