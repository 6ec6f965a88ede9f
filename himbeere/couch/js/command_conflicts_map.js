function (doc) {
  // A node's command documents (type <macid>_cmd) in conflict, by [node]:
  // the node resolves them (conflicts.py).
  var type = String(doc.type);
  if (doc._conflicts && type.length > 4 && type.slice(-4) === '_cmd') {
    emit([type.slice(0, -4)], null);
  }
}
