/// What bindings need of the handles: they cross threads and outlive the calls that made
/// them.
#[test]
fn handles_are_send_sync_and_static() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<super::Client>();
    shareable::<super::DocHandle>();
}
