// Lists the registered models of an aimass stack, then sends one Predict to a
// deployment and prints the first output tensor.
//
//   list_and_predict DEPLOYMENT [INPUT_NAME] [FEATURES]
//
// Addresses come from AIMASS_REGISTRY_ADDRESS / AIMASS_ROUTING_ADDRESS
// (default localhost:7105 / localhost:7106); AIMASS_API_KEY, when set, is sent
// as the x-api-key header. The input is one row of FEATURES float32 values
// 0.1, 0.2, ... sent as raw little-endian bytes (the fast path). Exit status:
// 0 when both calls succeed, 1 on a failed call, 2 on bad arguments.
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "aimass/registry/v1/registry.grpc.pb.h"
#include "aimass/routing/v1/routing.grpc.pb.h"

namespace {

std::string EnvOr(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : fallback;
}

// Every call carries the API key when one is configured.
void Authenticate(grpc::ClientContext* context) {
  const std::string key = EnvOr("AIMASS_API_KEY", "");
  if (!key.empty()) context->AddMetadata("x-api-key", key);
}

int Fail(const char* what, const grpc::Status& status) {
  std::cerr << what << " failed: code " << status.error_code() << ": "
            << status.error_message() << "\n";
  return 1;
}

int ListModels(const std::shared_ptr<grpc::Channel>& channel) {
  auto registry = aimass::registry::v1::RegistryService::NewStub(channel);
  aimass::registry::v1::ListRegisteredModelsRequest request;
  request.set_page_size(100);
  aimass::registry::v1::ListRegisteredModelsResponse response;
  grpc::ClientContext context;
  Authenticate(&context);
  const grpc::Status status = registry->ListRegisteredModels(&context, request, &response);
  if (!status.ok()) return Fail("ListRegisteredModels", status);
  for (const auto& model : response.registered_models()) {
    std::cout << "model " << model.name() << "\n";
  }
  return 0;
}

int Predict(const std::shared_ptr<grpc::Channel>& channel, const std::string& deployment,
            const std::string& input_name, int features) {
  auto prediction = aimass::routing::v1::PredictionService::NewStub(channel);
  aimass::routing::v1::PredictRequest request;
  request.set_deployment(deployment);
  auto* input = request.add_inputs();
  input->set_name(input_name);
  input->set_datatype("FP32");
  input->add_shape(1);
  input->add_shape(features);
  std::vector<float> row(features);
  for (int i = 0; i < features; ++i) row[i] = 0.1f * static_cast<float>(i + 1);
  // x86 and ARM are little-endian, the byte order raw contents use.
  request.add_raw_input_contents(reinterpret_cast<const char*>(row.data()),
                                 row.size() * sizeof(float));

  aimass::routing::v1::PredictResponse response;
  grpc::ClientContext context;
  Authenticate(&context);
  const grpc::Status status = prediction->Predict(&context, request, &response);
  if (!status.ok()) return Fail("Predict", status);
  if (response.outputs_size() == 0 || response.raw_output_contents_size() == 0) {
    std::cerr << "Predict returned no raw output\n";
    return 1;
  }
  const auto& output = response.outputs(0);
  std::cout << "predict " << response.deployment() << " version=" << response.model_version()
            << " output=" << output.name() << " shape=[";
  for (int i = 0; i < output.shape_size(); ++i) std::cout << (i ? "," : "") << output.shape(i);
  std::cout << "]\nvalues";
  const std::string& raw = response.raw_output_contents(0);
  for (size_t offset = 0; offset + sizeof(float) <= raw.size(); offset += sizeof(float)) {
    float value;
    std::memcpy(&value, raw.data() + offset, sizeof(float));
    std::cout << " " << value;
  }
  std::cout << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " DEPLOYMENT [INPUT_NAME] [FEATURES]\n";
    return 2;
  }
  const std::string deployment = argv[1];
  const std::string input_name = argc > 2 ? argv[2] : "input";
  const int features = argc > 3 ? std::atoi(argv[3]) : 8;
  if (features <= 0) {
    std::cerr << "FEATURES must be a positive integer\n";
    return 2;
  }
  const auto credentials = grpc::InsecureChannelCredentials();
  const int listed = ListModels(
      grpc::CreateChannel(EnvOr("AIMASS_REGISTRY_ADDRESS", "localhost:7105"), credentials));
  if (listed != 0) return listed;
  return Predict(grpc::CreateChannel(EnvOr("AIMASS_ROUTING_ADDRESS", "localhost:7106"), credentials),
                 deployment, input_name, features);
}
