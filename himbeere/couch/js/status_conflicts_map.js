function (doc) {
  // A node's own documents of the status database in conflict (status:,
  // history:, log:, result:), by [node]: the node resolves them (conflicts.py).
  if (doc._conflicts && doc.node !== undefined && doc.node !== null) {
    emit([String(doc.node)], null);
  }
}
