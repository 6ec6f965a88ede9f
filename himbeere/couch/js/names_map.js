function (doc) {
  if (doc.type === 'himbeere-node' && typeof doc.name === 'string') { emit(doc.name, doc.node); }
}
