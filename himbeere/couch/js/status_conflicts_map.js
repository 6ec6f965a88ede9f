function (doc) {
  // A node's own documents of the status database in conflict (status:,
  // history:, log:, result:), by [node]: the node resolves them (conflicts.py).
  // A program's shared state (state:*) is no one node's: by ["state"], for
  // any node of a site to resolve (the newest save wins).
  if (!doc._conflicts) {
    return;
  }
  if (doc._id.indexOf('state:') === 0) {
    emit(['state'], null);
  } else if (doc.node !== undefined && doc.node !== null) {
    emit([String(doc.node)], null);
  }
}
