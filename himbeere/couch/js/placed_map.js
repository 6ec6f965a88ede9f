function (doc) {
  if (doc.type !== 'himbeere-placed') { return; }
  emit(doc.name || doc._id, {replicas: doc.replicas === undefined ? 1 : doc.replicas,
                             labels: doc.labels || {}, requires: doc.requires || {},
                             enabled: doc.enabled !== false,
                             git: doc.git ? true : false});
}
