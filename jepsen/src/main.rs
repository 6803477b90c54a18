fn main() {
    println!("raftmgr-jepsen: see `bench` (coming)");
}
