//! A node started without a bootstrap address (the first node of a fleet)
//! finds the fleet again after a crash: it remembers the members it saw.

use crate::support::lab::{wait_for_members, Lab, SETTLE};
use crate::support::wait::wait_until;

#[test]
fn the_first_node_rejoins_after_a_crash_without_a_bootstrap_address() {
    let lab = Lab::new();
    let [mut first, second, third] = lab.fleet(["j1", "j2", "j3"], &[]);
    let peers = first.data_dir.join("cluster").join("peers");
    wait_until(SETTLE, "j1 to remember its peers", || {
        std::fs::read_to_string(&peers).is_ok_and(|text| text.lines().count() >= 2)
    });
    let peer_id = first.peer_id();

    first.kill();
    wait_for_members(&[&second, &third], &["j2", "j3"]);
    first.start();
    wait_for_members(&[&first, &second, &third], &["j1", "j2", "j3"]);
    assert_eq!(first.peer_id(), peer_id, "same node key, same peer id");
}
